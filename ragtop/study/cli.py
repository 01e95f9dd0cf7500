"""`ragtop study embeddings|attention|report` and `ragtop analyze`: argument parsing.

cli.py registers `add_study` and `add_analyze`; the logic lives in this package.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import RagtopError


def _size(s: str) -> int | None:
    if s in ("full", "all"):
        return None
    try:
        v = int(float(s.replace("K", "e3").replace("M", "e6")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count (1000, 5K, 1M) or 'full', got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"corpus size must be >= 1, got {v}")
    return v


def _data_dir(a) -> Path:
    return Path(a.data_dir or os.environ.get("RAGTOP_DATA_DIR") or Path.home() / ".cache" / "ragtop")


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report written to {out}")


def _budget_args(p, steps: int, batch: int, context: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--context", type=int, default=context)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="JSON report path")


def _budget(a):
    from .runs import Budget

    if min(a.steps, a.batch_size, a.context) < 1:
        raise RagtopError(
            f"--steps, --batch-size and --context must be >= 1, got {a.steps}, {a.batch_size}, {a.context}"
        )
    return Budget(steps=a.steps, batch_size=a.batch_size, context=a.context, lr=a.lr, warmup=min(20, a.steps))


def add_study(sub) -> None:
    from .attention import ATTENTION_SETUPS
    from .embeddings import SETUPS

    p = sub.add_parser("study", help="replication studies of the research summary (docs/replication.md)")
    ss = p.add_subparsers(dest="study", required=True, metavar="STUDY")

    e = ss.add_parser("embeddings", help="standard vs tiered embeddings over corpus sizes, matched parameters")
    e.add_argument("--setups", nargs="+", default=["v100-d64", "v200-d128"], help=f"{' | '.join(SETUPS)}")
    e.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=[1000, 5000, 20000, 50000, 1000000, None],
        help="training corpus sizes in tokens, or 'full' (default 1K 5K 20K 50K 1M full)",
    )
    e.add_argument("--score-tokens", type=int, default=16384, help="held-out (and training) tokens scored")
    _budget_args(e, 300, 16, 64)
    e.set_defaults(func=run_embeddings)

    t = ss.add_parser("attention", help="dense vs top-k attention quality at matched parameters")
    t.add_argument("--setup", default="v512-d64", help=f"{' | '.join(ATTENTION_SETUPS)}")
    t.add_argument("--topk", type=int, nargs="+", default=[4, 16, 32], help="k of the trained top-k arms")
    t.add_argument(
        "--drop-in-topk",
        type=int,
        nargs="*",
        default=None,
        help="k values to swap into the dense models without retraining (default: --topk)",
    )
    t.add_argument("--score-tokens", type=int, default=16384)
    _budget_args(t, 300, 16, 128)
    t.set_defaults(func=run_attention)

    r = ss.add_parser("report", help="render tables and plots of the JSON reports into docs")
    r.add_argument("--results", type=Path, default=Path("docs/replication"), help="folder of the JSON reports")
    r.add_argument("--doc", type=Path, default=Path("docs/replication.md"), help="markdown file with marker sections")
    r.set_defaults(func=run_report)


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="attention FLOPs, bytes and memory: theory, measured, and the summary's claims")
    p.add_argument("--time", action="store_true", help="also time torch attention (prefill and decode)")
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096, 8192, 16384, 32768],
        help="decode contexts for the speedup-vs-context measurement",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON report path (default: print tables only)")
    p.set_defaults(func=run_analyze)


def run_embeddings(a) -> int:
    import torch

    from .embeddings import run_embedding_study

    torch.set_num_threads(a.threads)
    report = run_embedding_study(
        _data_dir(a), a.setups, a.sizes, a.seeds, _budget(a), a.score_tokens, checkpoint=lambda r: _write(r, a.out)
    )
    _write(report, a.out)
    return 0


def run_attention(a) -> int:
    import torch

    from .attention import run_attention_study

    torch.set_num_threads(a.threads)
    report = run_attention_study(
        _data_dir(a),
        a.setup,
        a.topk,
        a.seeds,
        _budget(a),
        a.score_tokens,
        drop_in=a.drop_in_topk,
        checkpoint=lambda r: _write(r, a.out),
    )
    _write(report, a.out)
    return 0


def run_analyze(a) -> int:
    import torch

    from .analyze import analyze, format_tables

    torch.set_num_threads(a.threads)
    report = analyze(timing=a.time, contexts=a.contexts, repeats=a.repeats)
    print(format_tables(report))
    if a.out is not None:
        _write(report, a.out)
    return 0


def run_report(a) -> int:
    from .report import render

    for line in render(a.results, a.doc):
        print(line)
    return 0
