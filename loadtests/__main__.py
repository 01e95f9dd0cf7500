"""`python -m loadtests run|context-sweep|concurrency-sweep|bandwidth|report|peer|fuzz|soak|multiturn|speculative|
admission`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .loadgen import LoadConfig, run_load
from .metrics import format_summary, parse_slos


def _rate(text: str) -> float:
    return float("inf") if text.lower() in ("inf", "infinity") else float(text)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_run(sub) -> None:
    p = sub.add_parser("run", help="one load test against a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--model", help="model id to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="bearer token (else $OPENAI_API_KEY, if set)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (median for --dataset mix)")
    p.add_argument("--output-len", type=int, default=64, help="new tokens (median for --dataset mix)")
    p.add_argument(
        "--dataset",
        choices=["fixed", "mix"],
        default="fixed",
        help="fixed lengths (speed claims) or a log-normal mix of lengths (load)",
    )
    arr = p.add_argument_group(
        "arrivals: --request-rate inf + --max-concurrency C = C clients in a closed "
        "loop; a finite rate = Poisson arrivals; neither = all at once"
    )
    arr.add_argument("--request-rate", type=_rate, default=float("inf"), help="requests/s (default inf)")
    arr.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    arr.add_argument("--max-concurrency", "--concurrency", type=int, dest="max_concurrency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:100 e2e:20000")
    p.add_argument("--percentiles", default="90,99", help="besides mean and median (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--label", default="")
    p.add_argument("--json", type=Path, help="write the result document here")


def cmd_run(a: argparse.Namespace) -> int:
    import os

    try:
        slos = parse_slos(a.goodput)
    except ValueError as e:
        print(f"loadtests: error: {e}", file=sys.stderr)
        return 2
    cfg = LoadConfig(
        url=a.url,
        model=a.model,
        api_key=a.api_key or os.environ.get("OPENAI_API_KEY"),
        num_requests=a.num_requests,
        input_len=a.input_len,
        output_len=a.output_len,
        dataset=a.dataset,
        request_rate=a.request_rate,
        burstiness=a.burstiness,
        max_concurrency=a.max_concurrency,
        seed=a.seed,
        temperature=a.temperature,
        ignore_eos=a.ignore_eos,
        slos=slos,
        percentiles=tuple(float(x) for x in a.percentiles.split(",")),
        warmup=a.warmup,
        progress=a.progress,
        label=a.label,
    )
    try:
        doc = asyncio.run(run_load(cfg))
    except Exception as e:  # a CLI names the problem in one line
        print(f"loadtests: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_summary(doc["summary"], a.label or "load test"))
    if doc["server"] and doc["server"]["decode"].get("all"):
        print(f"server-side decode tokens/s (Δ counters): {doc['server']['decode']['all']['tokens_per_s']:.2f}")
    for note in doc["notes"]:
        print(f"note: {note}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1))
    return 0 if doc["summary"]["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_run(sub)
    from . import admission, bandwidth, fuzz, multiturn, peers, report, soak, speculative, sweeps

    sweeps.add_arguments(sub)
    fuzz.add_arguments(sub)
    soak.add_arguments(sub)
    multiturn.add_arguments(sub)
    speculative.add_arguments(sub)
    admission.add_arguments(sub)
    admission.add_decode_arguments(sub)
    bandwidth.add_arguments(sub)
    peers.add_arguments(sub)
    report.add_arguments(sub)
    a = p.parse_args(argv)
    if a.command == "run":
        return cmd_run(a)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
