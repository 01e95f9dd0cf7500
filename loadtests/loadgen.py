"""The async load generator: one run of requests against `/v1/completions`, streamed (SSE).

    result = asyncio.run(run_load(LoadConfig(url="http://127.0.0.1:8000", num_requests=32,
                                             max_concurrency=4, input_len=128, output_len=64)))

A request is timed on the client (time.perf_counter, offsets from the run's start); a 429
or any other non-200 answer is recorded (status, Retry-After) and not retried, so that a
sweep can see where the server starts refusing. The result is a JSON-ready dict
(`schema.py` describes it).
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from . import SCHEMA, prom
from .metrics import RequestResult, summarize
from .workload import BASE_TEXT, RequestSpec, arrival_times, make_requests


@dataclass
class LoadConfig:
    url: str
    model: str | None = None  # default: the first id of GET /v1/models
    api_key: str | None = None
    num_requests: int = 32
    input_len: int = 128
    output_len: int = 64
    dataset: str = "fixed"  # fixed | mix
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    slos: dict[str, float] = field(default_factory=dict)  # seconds
    percentiles: tuple[float, ...] = (90, 99)
    warmup: int = 1  # requests sent (and not counted) before the run
    settle_s: float = 0.0  # pause after the warm-up (lets an external scraper sample)
    timeout_s: float = 3600.0
    progress: bool = True
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        d["request_rate"] = "inf" if self.request_rate == float("inf") else self.request_rate
        d["percentiles"] = list(self.percentiles)
        return d


def _headers(cfg: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


async def served_model(client: httpx.AsyncClient, cfg: LoadConfig) -> str:
    r = await client.get(cfg.url + "/v1/models", headers=_headers(cfg))
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def base_tokens(client: httpx.AsyncClient, cfg: LoadConfig, notes: list[str]) -> list[int]:
    """BASE_TEXT in the served model's tokens (POST /tokenize); synthetic ids if that fails."""
    try:
        r = await client.post(cfg.url + "/tokenize", json={"prompt": BASE_TEXT}, headers=_headers(cfg))
        if r.status_code == 200:
            tokens = [int(t) for t in r.json()["tokens"]]
            if tokens:
                return tokens
    except (httpx.HTTPError, KeyError, ValueError):
        pass
    notes.append("POST /tokenize unavailable: prompts are synthetic token ids 100..1099")
    return list(range(100, 1100))


def request_body(cfg: LoadConfig, model: str, spec: RequestSpec) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "ignore_eos": cfg.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send(
    client: httpx.AsyncClient, cfg: LoadConfig, body: dict[str, Any], result: RequestResult, t0: float
) -> RequestResult:
    """POST one streaming completion and time it into `result` (offsets from t0)."""
    result.sent = time.perf_counter() - t0
    chunks = 0
    try:
        async with client.stream("POST", cfg.url + "/v1/completions", json=body, headers=_headers(cfg)) as r:
            result.status = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                result.retry_after = r.headers.get("retry-after")
                result.error = _error_message(text)
                result.done = time.perf_counter() - t0
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - t0
                msg = json.loads(data)
                if "error" in msg:
                    result.error = _error_message(data)
                    break
                choices = msg.get("choices") or []
                if choices and choices[0].get("text"):
                    chunks += 1
                    if result.first_token is None:
                        result.first_token = now
                    result.chunk_times.append(now)
                usage = msg.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.usage_prompt_tokens = usage.get("prompt_tokens")
        result.done = time.perf_counter() - t0
        if not result.output_tokens:
            result.output_tokens = chunks  # no usage chunk: one token per chunk
        result.ok = not result.error and result.first_token is not None
        if not result.ok and not result.error:
            result.error = "the stream ended without any text"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        result.done = time.perf_counter() - t0
    return result


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return text[:500]


def machine() -> dict[str, Any]:
    """A description of the machine a run measured (for the report)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": _cpu_count(),
    }
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        with open("/proc/meminfo", encoding="utf-8") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/loadavg", encoding="utf-8") as f:
            info["loadavg"] = [float(x) for x in f.read().split()[:3]]
    except OSError:
        pass
    for mod in ("onnxruntime", "torch", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """One load test; returns the result document (config, machine, summary, requests)."""
    cfg.url = cfg.url.rstrip("/")
    notes: list[str] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = cfg.model or await served_model(client, cfg)
        base = await base_tokens(client, cfg, notes)
        specs = make_requests(base, cfg.num_requests, cfg.input_len, cfg.output_len, cfg.dataset, cfg.seed)
        for i in range(cfg.warmup):
            w = await send(
                client,
                cfg,
                request_body(cfg, model, RequestSpec(base[:16], 4)),
                RequestResult(-1 - i, 16, 4),
                time.perf_counter(),
            )
            if not w.ok:
                notes.append(f"warm-up request failed: {w.status} {w.error}")
        if cfg.settle_s:
            await asyncio.sleep(cfg.settle_s)
        before = await prom.scrape(client, cfg.url)
        arrivals = arrival_times(cfg.num_requests, cfg.request_rate, cfg.seed, cfg.burstiness)
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = _progress(cfg)
        t0 = time.perf_counter()
        started_at = time.time()

        async def one(i: int, spec: RequestSpec) -> RequestResult:
            delay = arrivals[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            res = RequestResult(i, len(spec.prompt), spec.max_tokens)
            if sem is None:
                await send(client, cfg, request_body(cfg, model, spec), res, t0)
            else:
                async with sem:
                    await send(client, cfg, request_body(cfg, model, spec), res, t0)
            if bar is not None:
                bar.update(1)
            return res

        results = await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
        if bar is not None:
            bar.close()
        after = await prom.scrape(client, cfg.url)
    summary = summarize(list(results), cfg.slos, cfg.percentiles)
    server = prom.server_summary(before, after)
    if server is None:
        notes.append("GET /metrics unavailable: no server-side figures")
    return {
        "schema": SCHEMA,
        "kind": "run",
        "label": cfg.label,
        "started_at": started_at,
        "model": model,
        "config": cfg.to_json(),
        "machine": machine(),
        "summary": summary,
        "server": server,
        "notes": notes,
        "requests": [r.to_json() for r in results],
    }


def _progress(cfg: LoadConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg.num_requests,
        desc=cfg.label or "requests",
        unit="req",
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
