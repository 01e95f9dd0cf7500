"""Dense vs top-k attention quality at matched parameters.

Top-k attention has no parameters of its own, so every arm is the same architecture with
the same parameter count (checked): only the attention rule differs. Arms:

- `dense`:              trained and evaluated with dense attention;
- `topk{k}`:            trained and evaluated with exact top-k attention;
- `topk{k}-block{b}x{n}`: trained and evaluated with block-selected top-k (min/max block
                        summaries, n blocks + the query's own);
- `dense->topk{k}`:     the dense model evaluated with exact top-k, no retraining
                        (the "drop-in" use).

All arms train on the full training split with the same batches and token budget; loss is
mean NLL (nats/token) on held-out speeches (2010 on), perplexity = exp(loss).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import RagtopError
from ..model import AttentionConfig, ModelConfig
from .data import load_study_data
from .embeddings import summarize
from .runs import Budget, build_model, stream_loss, train_and_score

ATTENTION_SETUPS = {
    "v512-d64": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=176),
    "v512-d32": dict(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64),  # tests
}
BLOCK = (16, 2)  # block size, blocks kept besides the query's own


def run_attention_study(
    data_dir: Path,
    setup: str = "v512-d64",
    topks: Sequence[int] = (4, 16, 32),
    seeds: Sequence[int] = (0, 1, 2),
    budget: Budget = Budget(steps=300, batch_size=16, context=128),
    score_tokens: int = 16384,
    block: tuple[int, int] | None = BLOCK,
    corpus_tokens: int | None = None,
    drop_in: Sequence[int] | None = None,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Train every arm for every seed; `checkpoint(report)` after each arm."""
    if setup not in ATTENTION_SETUPS:
        raise RagtopError(f"unknown setup {setup!r}: choose from {', '.join(ATTENTION_SETUPS)}")
    if any(k < 1 for k in [*topks, *(drop_in or [])]):
        raise RagtopError(f"--topk values must be >= 1, got {list(topks)}")
    t_start = time.perf_counter()
    s = ATTENTION_SETUPS[setup]
    data = load_study_data(data_dir, s["vocab_size"], score_tokens, corpus_tokens)
    base = ModelConfig(**s, max_seq_len=budget.context)
    arms: dict[str, ModelConfig] = {"dense": base}
    for k in topks:
        arms[f"topk{k}"] = base.with_attention(AttentionConfig("topk", topk=k))
    if block is not None and topks:
        k = sorted(topks)[len(topks) // 2]
        arms[f"topk{k}-block{block[0]}x{block[1]}"] = base.with_attention(
            AttentionConfig("topk", topk=k, block_size=block[0], block_budget=block[1])
        )
    corpus = data.corpus(corpus_tokens)  # default: the full training split
    report: dict = {
        "study": "attention",
        "setup": {"name": setup, **s},
        "budget": {**asdict(budget), "tokens": budget.tokens},
        "seeds": list(seeds),
        "score_tokens": score_tokens,
        "corpus_tokens": len(corpus),
        "arms": {},
    }
    dense_states = {}
    for name, cfg in arms.items():
        runs = []
        for seed in seeds:
            r = train_and_score(cfg, None, corpus, data.heldout_stream, budget, seed, score_tokens)
            state = r.pop("state_dict")
            if name == "dense":
                dense_states[seed] = state
            runs.append(r)
        report["arms"][name] = _arm(cfg, runs)
        log(_line(name, report["arms"][name]))
        if name == "dense":  # the dense models with top-k swapped in, no retraining
            for k in topks if drop_in is None else drop_in:
                report["arms"][f"dense->topk{k}"] = _drop_in(
                    base, k, dense_states, data.heldout_stream, corpus, budget.context, score_tokens
                )
                log(_line(f"dense->topk{k}", report["arms"][f"dense->topk{k}"]))
        if checkpoint is not None:
            checkpoint(
                {
                    **report,
                    "seconds": round(time.perf_counter() - t_start, 1),
                    "complete": False,
                    "params_match": len({a["params"]["total"] for a in report["arms"].values()}) == 1,
                }
            )
    totals = {a["params"]["total"] for a in report["arms"].values()}
    report["params_match"] = len(totals) == 1
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["complete"] = True
    return report


def _drop_in(base: ModelConfig, k: int, states: dict, heldout, corpus, context: int, score_tokens: int) -> dict:
    cfg = base.with_attention(AttentionConfig("topk", topk=k))
    runs = []
    for seed, state in states.items():
        m = build_model(cfg, None, seed)
        m.load_state_dict(state)
        with torch.no_grad():
            runs.append(
                {
                    "seed": seed,
                    "heldout_loss": stream_loss(m, heldout, context, score_tokens),
                    "train_loss": stream_loss(m, corpus, context, score_tokens),
                    "params": m.parameter_counts(),
                    "seconds": 0.0,
                }
            )
    return _arm(cfg, runs)


def _arm(cfg: ModelConfig, runs: list[dict]) -> dict:
    held = summarize([r["heldout_loss"] for r in runs])
    return {
        "attention": cfg.attention.__dict__,
        "params": runs[0]["params"],
        "heldout_loss": held,
        "heldout_ppl": summarize([math.exp(r["heldout_loss"]) for r in runs]),
        "train_loss": summarize([r["train_loss"] for r in runs]),
        "seconds": sum(r["seconds"] for r in runs),
        "runs": runs,
    }


def _line(name: str, a: dict) -> str:
    return (
        f"{name:<22} params={a['params']['total']:>7} held-out loss {a['heldout_loss']['mean']:.4f}"
        f"±{a['heldout_loss']['std']:.4f} ppl {a['heldout_ppl']['mean']:.2f} ({a['seconds']:.0f}s)"
    )
