"""Per-request timings and the summary of a run (the figures `vllm bench serve` reports).

Definitions (times in seconds, measured on the client with a monotonic clock):

- TTFT: request sent -> first streamed chunk that carries text (empty chunks are skipped).
- ITL: the gaps between consecutive text-carrying chunks of one request.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request (undefined for one output token).
- E2E: request sent -> end of the stream.
- decode tokens/s of one request: (output tokens - 1) / (E2E - TTFT) = 1 / TPOT.
- request throughput: completed requests / duration; output throughput: output tokens of
  completed requests / duration; duration = first send -> last completion of the run.
- goodput: completed requests that meet every SLO (TTFT, TPOT, E2E bounds) / duration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2e")
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestResult:
    """What the client saw of one request. Times are offsets from the run's start."""

    index: int
    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0  # when the request was sent
    ok: bool = False
    status: int = 0  # HTTP status (0: no response)
    error: str = ""
    first_token: float | None = None  # the first text-carrying chunk
    chunk_times: list[float] = field(default_factory=list)  # every text-carrying chunk
    done: float | None = None  # end of the stream
    output_tokens: int = 0  # usage.completion_tokens (else the chunk count)
    usage_prompt_tokens: int | None = None
    retry_after: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("chunk_times")
        d["chunks"] = len(self.chunk_times)
        d.update(ttft=self.ttft, tpot=self.tpot, e2e=self.e2e, itl=self.itls)
        return d


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` (milliseconds, as vllm bench serve's --goodput) -> seconds."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"SLO {item!r}: expected NAME:MILLISECONDS with NAME one of {', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"SLO {item!r}: the bound must be > 0 ms")
        slos[key] = ms / 1000.0
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.ok:
        return False
    for key, bound in slos.items():
        value = getattr(r, key)
        # TPOT is undefined for a single output token: nothing to violate
        if value is None and key == "tpot":
            continue
        if value is None or value > bound:
            return False
    return True


def stats(values: list[float], percentiles: tuple[float, ...]) -> dict[str, float | int | None]:
    """mean, std, median, min, max and the percentiles (numpy's linear interpolation)."""
    out: dict[str, float | int | None] = {"count": len(values)}
    if not values:
        out.update({"mean": None, "std": None, "median": None, "min": None, "max": None})
        out.update({f"p{_pct_name(p)}": None for p in percentiles})
        return out
    a = np.asarray(values, dtype=np.float64)
    out.update(
        mean=float(a.mean()), std=float(a.std()), median=float(np.median(a)), min=float(a.min()), max=float(a.max())
    )
    for p in percentiles:
        out[f"p{_pct_name(p)}"] = float(np.percentile(a, p))
    return out


def _pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p).replace(".", "_")


def summarize(
    results: list[RequestResult],
    slos: dict[str, float] | None = None,
    percentiles: tuple[float, ...] = (90, 99),
    duration: float | None = None,
) -> dict[str, Any]:
    """The run's figures from its requests. `duration` defaults to first send -> last end."""
    slos = slos or {}
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if duration is None:
        ends = [r.done for r in results if r.done is not None]
        starts = [r.sent for r in results]
        duration = (max(ends) - min(starts)) if ends and starts else 0.0
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.prompt_tokens for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    statuses: dict[str, int] = {}
    for r in failed:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    good = sum(1 for r in done if meets_slos(r, slos)) if slos else None
    decode_rates = [1.0 / r.tpot for r in done if r.tpot]
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(done),
        "failed": len(failed),
        "failed_by_status": statuses,
        "rejected_429": statuses.get("429", 0),
        "duration_s": duration,
        "total_prompt_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "slos_s": slos,
        "good_requests": good,
        "goodput": per_s(good) if good is not None else None,
        "decode_tokens_per_s": stats(decode_rates, percentiles),
    }
    lat = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for t in (r.tpot for r in done) if t is not None],
        "itl": [x for r in done for x in r.itls],
        "e2e": [r.e2e for r in done if r.e2e is not None],
    }
    for key in LATENCIES:
        summary[f"{key}_s"] = stats(lat[key], percentiles)
    return summary


def fmt_ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.1f}"


def format_summary(summary: dict[str, Any], title: str = "load test") -> str:
    """The terminal summary (vllm bench serve's layout)."""

    def num(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        f"{'=' * 20} {title} {'=' * 20}",
        f"{'Successful requests:':<40}{summary['completed']:>12}",
        f"{'Failed requests:':<40}{summary['failed']:>12}",
    ]
    if summary["failed_by_status"]:
        by = ", ".join(f"{k}: {v}" for k, v in sorted(summary["failed_by_status"].items()))
        lines.append(f"{'  by status:':<40}{by:>12}")
    lines += [
        f"{'Benchmark duration (s):':<40}{num(summary['duration_s']):>12}",
        f"{'Total input tokens:':<40}{summary['total_prompt_tokens']:>12}",
        f"{'Total generated tokens:':<40}{summary['total_output_tokens']:>12}",
        f"{'Request throughput (req/s):':<40}{num(summary['request_throughput']):>12}",
        f"{'Output token throughput (tok/s):':<40}{num(summary['output_throughput']):>12}",
        f"{'Total token throughput (tok/s):':<40}{num(summary['total_token_throughput']):>12}",
    ]
    if summary["goodput"] is not None:
        slos = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in summary["slos_s"].items())
        lines.append(f"{'Request goodput (req/s):':<40}{num(summary['goodput']):>12}   ({slos})")
    names = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2e": "End-to-end Latency",
    }
    for key in LATENCIES:
        s = summary[f"{key}_s"]
        lines.append(f"{'-' * 10}{names[key]}{'-' * 10}")
        for stat in [k for k in s if k in ("mean", "median") or (k.startswith("p") and k[1:2].isdigit())]:
            lines.append(f"{f'{stat.capitalize()} {key.upper()} (ms):':<40}{fmt_ms(s[stat]):>12}")
    lines.append("=" * (42 + len(title)))
    return "\n".join(lines)
