"""Standard (uniform) vs tiered (ragged) embeddings over corpus sizes.

For each configuration (vocabulary V, width D, body) and corpus size, three arms train on
the same batches for the same number of tokens:

- `standard`:             uniform [V, D] table, tied head.
- `tiered_same_body`:     ragged tiers (widths D, D/4, D/16 by default, cut at 80% / 95% of
                          the corpus's token mass), tied tiered head, the *same* body: equal
                          non-embedding parameters, totals differ by the embedding difference
                          (this is the summary's setting: "same model, other embedding").
- `tiered_same_total`:    ragged tiers, with the body's MLP width (d_ff) changed so that the
                          total parameter count matches `standard` within 1%.

Tiers are planned from the token counts of the training corpus at hand (what a user of a
small corpus would know). Losses are mean NLL in nats per token on held-out speeches
(2010 on) and, next to them, on the training corpus itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import RagtopError
from ..model import EmbeddingConfig, ModelConfig, Transformer
from ..train.tiers import (
    DEFAULT_MASS_CUTS,
    DEFAULT_WIDTH_FACTORS,
    TierPlan,
    plan_tiers,
    token_counts,
)
from .data import load_study_data
from .runs import Budget, train_and_score

ARMS = ("standard", "tiered_same_body", "tiered_same_total")
MATCH_TOLERANCE = 0.01


@dataclass(frozen=True)
class EmbeddingSetup:
    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int


SETUPS = {
    # the summary's two configurations (100 vocab / 64 dims, 200 vocab / 128 dims) with a
    # one-layer body, as the summary's 100/64 parameter count implies (see docs/replication.md)
    "v100-d64": EmbeddingSetup("v100-d64", 100, 64, 1, 4, 128),
    "v200-d128": EmbeddingSetup("v200-d128", 200, 128, 1, 4, 256),
    # a vocabulary where tiering is meant to pay: embeddings dominate the parameters
    "v2048-d128": EmbeddingSetup("v2048-d128", 2048, 128, 1, 4, 256),
    # for tests
    "v64-d32": EmbeddingSetup("v64-d32", 64, 32, 1, 2, 64),
}

# corpus sizes in tokens; None is the full training split
SUMMARY_SIZES = (1_000, 5_000, 20_000, 50_000)
DEFAULT_SIZES: tuple[int | None, ...] = (*SUMMARY_SIZES, 1_000_000, None)


def base_config(s: EmbeddingSetup, context: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=s.vocab_size,
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        n_kv_heads=s.n_heads,
        d_ff=s.d_ff,
        max_seq_len=context,
    )


def count_params(cfg: ModelConfig) -> dict[str, int]:
    return Transformer(cfg).parameter_counts()  # small models: building one takes milliseconds


def match_total(standard: ModelConfig, tiered: ModelConfig) -> ModelConfig:
    """The tiered config with the d_ff whose total parameter count is closest to `standard`'s."""
    target = count_params(standard)["total"]
    base = count_params(tiered)["total"]
    per_unit = 3 * tiered.d_model * tiered.n_layers  # gate, up, down rows/columns per d_ff unit
    d_ff = max(1, tiered.d_ff + round((target - base) / per_unit))
    matched = replace(tiered, d_ff=d_ff)
    got = count_params(matched)["total"]
    if abs(got - target) > MATCH_TOLERANCE * target:
        raise RagtopError(f"cannot match {target} parameters by the MLP width alone (closest {got} at d_ff={d_ff})")
    return matched


def arm_configs(s: EmbeddingSetup, plan: TierPlan, context: int) -> dict[str, ModelConfig]:
    std = base_config(s, context)
    tiered = std.with_embedding(EmbeddingConfig("ragged", plan.sizes, plan.widths))
    return {"standard": std, "tiered_same_body": tiered, "tiered_same_total": match_total(std, tiered)}


def summarize(values: Sequence[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def run_embedding_study(
    data_dir: Path,
    setups: Sequence[str] = ("v100-d64", "v200-d128"),
    sizes: Sequence[int | None] = DEFAULT_SIZES,
    seeds: Sequence[int] = (0, 1, 2),
    budget: Budget = Budget(steps=300, batch_size=16, context=64),
    score_tokens: int = 16384,
    mass_cuts: Sequence[float] = DEFAULT_MASS_CUTS,
    width_factors: Sequence[float] = DEFAULT_WIDTH_FACTORS,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run every setup x corpus size x arm x seed; `checkpoint(report)` after each corpus size."""
    t_start = time.perf_counter()
    report: dict = {
        "study": "embeddings",
        "budget": {**asdict(budget), "tokens": budget.tokens},
        "seeds": list(seeds),
        "score_tokens": score_tokens,
        "mass_cuts": list(mass_cuts),
        "width_factors": list(width_factors),
        "setups": {},
    }
    for name in setups:
        if name not in SETUPS:
            raise RagtopError(f"unknown setup {name!r}: choose from {', '.join(SETUPS)}")
        s = SETUPS[name]
        need = None if any(n is None for n in sizes) else max(sizes)
        data = load_study_data(data_dir, s.vocab_size, score_tokens, need)
        rows = []
        for size in sizes:
            corpus = data.corpus(size)
            plan = plan_tiers(token_counts([corpus], s.vocab_size), s.d_model, mass_cuts, width_factors)
            cfgs = arm_configs(s, plan, budget.context)
            row = {
                "corpus_tokens": len(corpus),
                "full_corpus": size is None,
                "distinct_tokens_seen": int(np.count_nonzero(np.bincount(corpus, minlength=s.vocab_size))),
                "tiers": {"sizes": list(plan.sizes), "widths": list(plan.widths), "mass": list(plan.mass)},
                "arms": {},
            }
            for arm, cfg in cfgs.items():
                runs = [
                    train_and_score(
                        cfg,
                        None if arm == "standard" else plan,
                        corpus,
                        data.heldout_stream,
                        budget,
                        seed,
                        score_tokens,
                    )
                    for seed in seeds
                ]
                for r in runs:
                    r.pop("state_dict")
                row["arms"][arm] = {
                    "d_ff": cfg.d_ff,
                    "params": runs[0]["params"],
                    "heldout_loss": summarize([r["heldout_loss"] for r in runs]),
                    "train_loss": summarize([r["train_loss"] for r in runs]),
                    "last_batch_loss": summarize([r["last_batch_loss"] for r in runs]),
                    "epochs": runs[0]["epochs"],
                    "seconds": sum(r["seconds"] for r in runs),
                    "runs": runs,
                }
                a = row["arms"][arm]
                log(
                    f"{name} corpus={len(corpus):>9} {arm:<18} params={a['params']['total']:>7} "
                    f"held-out {a['heldout_loss']['mean']:.4f}±{a['heldout_loss']['std']:.4f} "
                    f"train {a['train_loss']['mean']:.4f}±{a['train_loss']['std']:.4f} ({a['seconds']:.0f}s)"
                )
            rows.append(row)
            report["setups"][name] = {"setup": asdict(s), "heldout_tokens": len(data.heldout_stream), "rows": rows}
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            if checkpoint is not None:
                checkpoint({**report, "complete": False})
    report["complete"] = True
    return report
