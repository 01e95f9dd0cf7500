"""Server-side figures from `GET /metrics`.

Two scrapes around a run give what PromQL's `rate()` gives over the same window:
`rate(c[w]) = Δc / w`, and for a ratio of two counters scraped at the same instants the
window cancels: `rate(tokens[w]) / rate(seconds[w]) = Δtokens / Δseconds`. This is used when
no Prometheus server is available (`prometheus_server.py` runs a real one when the binary is
installed, and the report says which one produced each figure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Scrape:
    at: float  # time.time() of the scrape
    samples: dict[Key, float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float | None:
        """Sum of the samples called `name` whose labels include `labels`."""
        found = [
            v
            for (n, ls), v in self.samples.items()
            if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
        ]
        return sum(found) if found else None

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {ls: v for (n, ls), v in self.samples.items() if n == name}


def parse(text: str, at: float | None = None) -> Scrape:
    s = Scrape(time.time() if at is None else at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            s.samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return s


async def scrape(client: httpx.AsyncClient, url: str) -> Scrape | None:
    """One scrape of `url`/metrics; None when the server has no metrics endpoint."""
    try:
        r = await client.get(url.rstrip("/") + "/metrics")
    except httpx.HTTPError:
        return None
    return parse(r.text) if r.status_code == 200 else None


def scrape_sync(url: str, timeout: float = 10.0) -> Scrape | None:
    try:
        r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    except httpx.HTTPError:
        return None
    return parse(r.text) if r.status_code == 200 else None


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float | None:
    a, b = before.get(name, **labels), after.get(name, **labels)
    if b is None:
        return None
    return b - (a or 0.0)


def decode_throughput(before: Scrape, after: Scrape) -> dict[str, dict[str, float]]:
    """Server-side decode tokens/s between two scrapes, per `attention/context_bucket` and in
    total: Δ ragtop:decode_tokens_total / Δ ragtop:decode_seconds_total."""
    out: dict[str, dict[str, float]] = {}
    tokens_after = after.series("ragtop:decode_tokens_total")
    total_tok = total_s = 0.0
    for labels, tok_b in tokens_after.items():
        tok_a = before.samples.get(("ragtop:decode_tokens_total", labels), 0.0)
        sec_b = after.samples.get(("ragtop:decode_seconds_total", labels), 0.0)
        sec_a = before.samples.get(("ragtop:decode_seconds_total", labels), 0.0)
        dt, ds = tok_b - tok_a, sec_b - sec_a
        if dt <= 0 or ds <= 0:
            continue
        d = dict(labels)
        out[f"{d.get('attention', '?')}/{d.get('context_bucket', '?')}"] = {
            "tokens": dt,
            "seconds": ds,
            "tokens_per_s": dt / ds,
        }
        total_tok, total_s = total_tok + dt, total_s + ds
    if total_s > 0:
        out["all"] = {"tokens": total_tok, "seconds": total_s, "tokens_per_s": total_tok / total_s}
    return out


def server_summary(before: Scrape | None, after: Scrape | None) -> dict | None:
    """What the report quotes from the server's own metrics for one run window."""
    if before is None or after is None:
        return None
    window = after.at - before.at
    gen = delta(before, after, "ragtop:generation_tokens_total")
    prompt = delta(before, after, "ragtop:prompt_tokens_total")
    return {
        "source": "two scrapes of /metrics (PromQL rate() equivalent)",
        "window_s": window,
        "generation_tokens": gen,
        "prompt_tokens": prompt,
        "generation_tokens_per_s": (gen / window) if gen is not None and window > 0 else None,
        "decode": decode_throughput(before, after),
        "peak_resident_memory_bytes": after.get("ragtop:peak_resident_memory_bytes"),
        "resident_memory_bytes": after.get("ragtop:resident_memory_bytes"),
        "kv_cache_total_bytes": after.get("ragtop:kv_cache_total_bytes"),
        "http_errors": {
            dict(ls).get("status", "?"): v - before.samples.get(("ragtop:http_errors_total", ls), 0.0)
            for ls, v in after.series("ragtop:http_errors_total").items()
        },
    }
