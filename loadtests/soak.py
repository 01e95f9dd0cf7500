"""`python -m loadtests soak --duration SECONDS`: a closed-loop mixed workload against a real
`ragtop serve`, counting every error and watching the server's memory.

C clients loop until the time is up, each request drawn (seeded) from a mix: plain and
streaming completions and chats, n > 1, seeded sampling at odd temperatures, clients that
disconnect mid-stream, and requests that must be refused (a 4xx naming the problem, counted
as expected). An error is anything else: a 5xx, a transport failure, a stream without
`[DONE]`, an unexpected status. Resident memory (VmRSS) of the server process is sampled
throughout; growth is the last sample over the first one taken after the warm-up.

    python -m loadtests soak --duration 600                  # a tiny model built for the run
    python -m loadtests soak --duration 600 --model runs/smollm2-top256-onnx --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .server import ServerProcess, proc_status_bytes

KINDS = ("plain", "stream", "chat", "chat_stream", "n", "disconnect", "bad")
WEIGHTS = (3, 3, 2, 2, 1, 1, 1)


@dataclass
class SoakResult:
    requests: Counter = field(default_factory=Counter)  # by kind
    outcomes: Counter = field(default_factory=Counter)  # ok / expected_4xx / error:<class>
    latencies: list[float] = field(default_factory=list)  # seconds, completed requests
    errors: list[str] = field(default_factory=list)  # the first few, for the report
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    def error(self, what: str, detail: str) -> None:
        self.outcomes[f"error:{what}"] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{what}: {detail[:300]}")


def body_for(kind: str, rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    """(path, body) of one request of this kind."""
    prompt = rng.choice(["The quick brown fox", "State of the Union", "Numbers 12345 and", "Unicode: café 日本"])
    sampling = rng.choice(
        [
            {"temperature": 0},
            {"temperature": 0.7, "top_p": 0.9, "seed": rng.randrange(2**31)},
            {"temperature": 1e-9},
            {"temperature": 1.5, "top_k": 5, "repetition_penalty": 1.3},
        ]
    )
    n_tokens = rng.randint(1, max_tokens)
    if kind in ("chat", "chat_stream"):
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": n_tokens,
            "stream": kind == "chat_stream",
            **sampling,
        }
    if kind == "bad":
        return "/v1/completions", rng.choice(
            [
                {"prompt": prompt, "max_tokens": 0},
                {"prompt": prompt, "logit_bias": {"--5": 1}},
                {"prompt": prompt, "seed": 2**64},
                {"prompt": [10**9]},
                {"messages": "not a prompt"},
            ]
        )
    body = {"prompt": prompt, "max_tokens": n_tokens, "stream": kind in ("stream", "disconnect"), **sampling}
    if kind == "n":
        body.update(n=rng.randint(2, 3), temperature=0.8)
    return "/v1/completions", body


async def one_request(
    client: httpx.AsyncClient, kind: str, rng: random.Random, res: SoakResult, max_tokens: int
) -> None:
    path, body = body_for(kind, rng, max_tokens)
    t0 = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await client.post(path, json=body)
            if kind == "bad":
                ok = 400 <= r.status_code < 500 and "error" in r.json()
                res.outcomes["expected_4xx" if ok else "error:bad_not_refused"] += 1
                return
            if r.status_code != 200:
                res.error(f"http_{r.status_code}", r.text)
                return
            if not r.json().get("choices"):
                res.error("no_choices", r.text)
                return
        else:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    res.error(f"http_{r.status_code}", (await r.aread()).decode(errors="replace"))
                    return
                events = 0
                done = False
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    events += 1
                    if line == "data: [DONE]":
                        done = True
                    elif '"error"' in line and line.startswith('data: {"error"'):
                        res.error("stream_error_event", line)
                        return
                    if kind == "disconnect" and events >= rng.randint(1, 3):
                        res.outcomes["disconnected"] += 1
                        return  # leaving the block closes the connection mid-stream
                if not done:
                    res.error("stream_without_done", f"{events} events")
                    return
    except httpx.HTTPError as e:
        res.error(type(e).__name__, str(e))
        return
    res.latencies.append(time.perf_counter() - t0)
    res.outcomes["ok"] += 1


async def soak(
    url: str, duration: float, concurrency: int, seed: int, max_tokens: int, pid: int | None, warmup: float = 5.0
) -> SoakResult:
    res = SoakResult()
    start = time.monotonic()
    deadline = start + duration

    async def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                kind = rng.choices(KINDS, WEIGHTS)[0]
                res.requests[kind] += 1
                await one_request(client, kind, rng, res, max_tokens)

    async def watch_memory() -> None:
        if pid is None:
            return
        await asyncio.sleep(min(warmup, duration / 4))
        while time.monotonic() < deadline:
            rss = proc_status_bytes(pid, "VmRSS")
            if rss is not None:
                res.rss.append((round(time.monotonic() - start, 1), rss))
            await asyncio.sleep(max(1.0, duration / 120))

    await asyncio.gather(watch_memory(), *(client_loop(i) for i in range(concurrency)))
    if pid is not None and (rss := proc_status_bytes(pid, "VmRSS")) is not None:
        res.rss.append((round(time.monotonic() - start, 1), rss))
    return res


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(res: SoakResult, duration: float, concurrency: int) -> dict:
    errors = {k.removeprefix("error:"): v for k, v in res.outcomes.items() if k.startswith("error:")}
    rss0, rss1 = (res.rss[0][1], res.rss[-1][1]) if res.rss else (None, None)
    return {
        "duration_s": duration,
        "concurrency": concurrency,
        "requests": sum(res.requests.values()),
        "requests_by_kind": dict(res.requests),
        "outcomes": dict(res.outcomes),
        "errors": sum(errors.values()),
        "errors_by_class": errors,
        "first_errors": res.errors,
        "latency_s": {f"p{q}": percentile(res.latencies, q) for q in (50, 90, 99)}
        | {"max": max(res.latencies, default=None)},
        "rss_first_bytes": rss0,
        "rss_last_bytes": rss1,
        "rss_growth_perc": None if not rss0 else round(100 * (rss1 - rss0) / rss0, 2),
        "rss_samples": res.rss,
    }


def add_arguments(sub) -> None:
    p = sub.add_parser("soak", help="closed-loop mixed workload for a while: errors by class, latency, RSS growth")
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens drawn (default %(default)s)")
    p.add_argument("--model", type=Path, help="exported model folder (default: a tiny model built for the run)")
    p.add_argument("--url", help="soak a server already running here instead (RSS then needs --pid)")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, for its RSS")
    p.add_argument("--threads", type=int, default=1, help="the started server's intra-op threads")
    p.add_argument("--json", type=Path, help="write the result document here")
    p.set_defaults(func=cmd_soak)


def cmd_soak(a: argparse.Namespace) -> int:
    server = None
    tmp = None
    if a.url is None:
        from .fuzz import build_tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="ragtop-soak-")
        model = a.model or build_tiny_model(Path(tmp.name))
        server = ServerProcess(
            model, ["--threads", str(a.threads), "--max-batch-size", "8"], log_path=Path(tmp.name) / "server.log"
        ).start()
        url, pid = server.url, server.proc.pid
    else:
        url, pid = a.url, a.pid
    try:
        res = asyncio.run(soak(url, a.duration, a.concurrency, a.seed, a.max_tokens, pid))
    finally:
        exit_code = server.stop() if server is not None else None
        log = (Path(tmp.name) / "server.log").read_text(errors="replace") if tmp else ""
        if tmp is not None:
            tmp.cleanup()
    doc = summarize(res, a.duration, a.concurrency) | {
        "server_exit_code": exit_code,
        "server_tracebacks": log.count("Traceback"),
    }
    lat = doc["latency_s"]
    print(f"{doc['requests']} requests in {a.duration:g} s with {a.concurrency} clients: {doc['outcomes']}")
    print(f"errors: {doc['errors']} {doc['errors_by_class'] or ''}")
    for e in doc["first_errors"][:5]:
        print(f"  {e}")
    print("latency of completed requests: " + ", ".join(f"{k} {v:.3f} s" for k, v in lat.items() if v is not None))
    if doc["rss_growth_perc"] is not None:
        print(
            f"server RSS {doc['rss_first_bytes'] / 2**20:.1f} -> {doc['rss_last_bytes'] / 2**20:.1f} MiB "
            f"({doc['rss_growth_perc']:+.2f} %)"
        )
    if exit_code is not None:
        print(f"server exit status after SIGTERM: {exit_code}; tracebacks in its log: {doc['server_tracebacks']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1))
    return 0 if doc["errors"] == 0 and exit_code in (None, 0) else 1
