"""Quality sweep of training-free conversions: dense vs top-k vs ragged vs both.

Every variant is built in memory from one dense checkpoint and scored on the same
held-out passages (State of the Union speeches from 2010 on), in two settings:

- long:  the first `long_tokens` tokens (8,192 = SmolLM2's context) of each of the first
         `long_passages` held-out speeches that are at least that long, one window each;
- short: the first `short_tokens` tokens of each of the first `short_passages` speeches.

Each passage is [document separator] + tokens; every token is predicted once. Bits per
byte divide the NLL in bits by the UTF-8 bytes of the scored text. CPU cost is about
that of (long_passages * long_tokens + short_passages * short_tokens) forward tokens per
variant (a 135M model on 2 cores: roughly a minute per 8k tokens).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..model import Transformer
from ..train.evaluate import score_windows
from .sparsify import (
    TierSpec,
    frequency_tiers,
    parse_tiers,
    tier_mass,
    to_ragged,
    topk_attention,
    with_attention,
)

DEFAULT_TOPKS = (64, 16, 32, 128, 256)  # the first one is run first
DEFAULT_TIER_SPECS = ("16384:576,*:288", "8192:576,16384:384,*:192")
DEFAULT_COMBINED = ((64, "16384:576,*:288"),)


@dataclass(frozen=True)
class Variant:
    topk: int | None = None
    tiers: TierSpec | None = None

    @property
    def name(self) -> str:
        parts = [f"top-{self.topk}" if self.topk else "dense"]
        if self.tiers is not None:
            parts.append(f"ragged {self.tiers}")
        return " + ".join(parts)


@dataclass(frozen=True)
class Passage:
    ids: torch.Tensor  # [1 + n]: separator + tokens
    bytes: int
    title: str


def default_variants(
    topks: Sequence[int] = DEFAULT_TOPKS,
    tier_specs: Sequence[str] = DEFAULT_TIER_SPECS,
    combined: Sequence[tuple[int, str]] = DEFAULT_COMBINED,
) -> list[Variant]:
    """Dense, the first k, the tier specs, the combinations, then the other k values.

    This order answers the default choice (dense vs top-k vs ragged vs both) first, so an
    interrupted sweep is still useful; `markdown_table` sorts the rows back.
    """
    first, *rest = topks
    return (
        [Variant(), Variant(topk=first)]
        + [Variant(tiers=parse_tiers(s)) for s in tier_specs]
        + [Variant(topk=k, tiers=parse_tiers(s)) for k, s in combined]
        + [Variant(topk=k) for k in rest]
    )


def make_passages(documents: Sequence[tuple[str, str]], tokenizer, sep_id: int, length: int, count: int) -> list[Passage]:
    """The first `length` tokens of the first `count` documents (title, text) that long."""
    out = []
    for title, text in documents:
        enc = tokenizer.encode(text)
        if len(enc.ids) < length:
            continue
        end_char = enc.offsets[length - 1][1]
        ids = torch.tensor([sep_id, *enc.ids[:length]], dtype=torch.long)
        out.append(Passage(ids, len(text[:end_char].encode("utf-8")), title))
        if len(out) == count:
            break
    return out


def score(model: Transformer, passages: Sequence[Passage]) -> dict:
    nll = sum(score_windows(model, p.ids, p.ids.numel() - 1, batch_size=1) for p in passages)
    tokens = sum(p.ids.numel() - 1 for p in passages)
    nbytes = sum(p.bytes for p in passages)
    return {"perplexity": math.exp(nll / tokens), "bits_per_byte": nll / math.log(2) / nbytes, "tokens": tokens}


def build_variant(dense: Transformer, variant: Variant, counts: np.ndarray | None) -> Transformer:
    model = dense
    if variant.tiers is not None:
        sizes, widths = variant.tiers.resolve(dense.config.vocab_size, dense.config.d_model)
        model = to_ragged(model, frequency_tiers(counts, sizes), widths)
    if variant.topk is not None:
        model = with_attention(model, topk_attention(variant.topk))
    return model


@torch.no_grad()
def run_sweep(
    ckpt: Checkpoint,
    variants: Sequence[Variant],
    heldout: Sequence[tuple[str, str]],
    counts: np.ndarray | None,
    long_tokens: int = 8192,
    long_passages: int = 1,
    short_tokens: int = 512,
    short_passages: int = 2,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Score every variant; returns (and appends to `out` as JSON lines) one row each."""
    tok = ckpt.tokenizer()
    sep = int(ckpt.generation.get("document_separator_id", ckpt.generation.get("bos_token_id", 0)))
    sets = {
        "long": make_passages(heldout, tok, sep, long_tokens, long_passages),
        "short": make_passages(heldout, tok, sep, short_tokens, short_passages),
    }
    for name, ps in sets.items():
        log(f"{name}: {len(ps)} passage(s) of {ps[0].ids.numel() - 1 if ps else 0} tokens: {', '.join(p.title for p in ps)}")
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        model = build_variant(ckpt.model, v, counts)
        pc = model.parameter_counts()
        row = {
            "variant": v.name,
            "topk": v.topk,
            "tiers": None if v.tiers is None else str(v.tiers),
            "embedding_params": pc["embedding"],
            "head_params": pc["head"],
            "total_params": pc["total"],
        }
        if v.tiers is not None:
            row["tier_mass"] = [round(m, 4) for m in tier_mass(counts, model.embed.tiers())]
        for name, ps in sets.items():
            row[name] = score(model, ps)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log(format_row(row))
        if out is not None:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def format_row(row: dict) -> str:
    return (
        f"{row['variant']:<44} emb+head {(row['embedding_params'] + row['head_params']) / 1e6:6.2f}M  "
        f"long ppl {row['long']['perplexity']:7.3f} bpb {row['long']['bits_per_byte']:.4f}  "
        f"short ppl {row['short']['perplexity']:7.3f} bpb {row['short']['bits_per_byte']:.4f}  ({row['seconds']}s)"
    )


def markdown_table(rows: Sequence[dict]) -> str:
    """The sweep as a Markdown table, with each variant's change in perplexity vs dense."""
    rows = sorted(rows, key=lambda r: (r["tiers"] is not None, r["topk"] is not None, r["topk"] or 0, -r["embedding_params"]))
    dense = next((r for r in rows if r["topk"] is None and r["tiers"] is None), rows[0])
    lines = [
        "| variant | embedding + head params | long ppl | long bits/byte | Δ long ppl | short ppl | short bits/byte | Δ short ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        def delta(k: str, r: dict = r) -> str:
            return f"{100 * (r[k]['perplexity'] / dense[k]['perplexity'] - 1):+.2f}%"

        lines.append(
            f"| {r['variant']} | {(r['embedding_params'] + r['head_params']) / 1e6:.2f}M "
            f"| {r['long']['perplexity']:.3f} | {r['long']['bits_per_byte']:.4f} | {delta('long')} "
            f"| {r['short']['perplexity']:.3f} | {r['short']['bits_per_byte']:.4f} | {delta('short')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ragtop.convert.sweep ROWS.jsonl: the table of (appended) sweeps
    import sys

    print(markdown_table([json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]))
