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
from ..errors import RagtopError
from ..model import AttentionConfig, ConfigError, Transformer
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


def make_passages(
    documents: Sequence[tuple[str, str]], tokenizer, sep_id: int, length: int, count: int
) -> list[Passage]:
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
        log(
            f"{name}: {len(ps)} passage(s) of {ps[0].ids.numel() - 1 if ps else 0} tokens: "
            f"{', '.join(p.title for p in ps)}"
        )
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
        _record(row, rows, out, log, format_row)
    return rows


def _record(row: dict, rows: list[dict], out: Path | None, log, fmt) -> None:
    """A finished row: kept, logged with `fmt`, and appended to the JSONL file (so a long
    sweep's finished rows survive an interruption)."""
    rows.append(row)
    log(fmt(row))
    if out is not None:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def format_row(row: dict) -> str:
    return (
        f"{row['variant']:<44} emb+head {(row['embedding_params'] + row['head_params']) / 1e6:6.2f}M  "
        f"long ppl {row['long']['perplexity']:7.3f} bpb {row['long']['bits_per_byte']:.4f}  "
        f"short ppl {row['short']['perplexity']:7.3f} bpb {row['short']['bits_per_byte']:.4f}  ({row['seconds']}s)"
    )


def markdown_table(rows: Sequence[dict]) -> str:
    """The sweep as a Markdown table, with each variant's change in perplexity vs dense."""
    rows = sorted(
        rows, key=lambda r: (r["tiers"] is not None, r["topk"] is not None, r["topk"] or 0, -r["embedding_params"])
    )
    dense = next((r for r in rows if r["topk"] is None and r["tiers"] is None), rows[0])
    lines = [
        "| variant | embedding + head params | long ppl | long bits/byte | Δ long ppl | short ppl | short bits/byte | "
        "Δ short ppl |",
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


# -- calibration of sparse settings on long text ------------------------------------------
@dataclass(frozen=True)
class SparseSetting:
    """One sparse-attention setting: `topk` None = every key of the chosen blocks (Quest)."""

    topk: int | None = 256
    block_size: int | None = None
    block_budget: int | None = None
    sink_tokens: int = 0
    local_window: int = 0
    dense_layers: int = 0
    layer_budgets: tuple[int, ...] = ()  # one block budget per layer (block_budget: their maximum)

    @property
    def name(self) -> str:
        parts = ["all" if self.topk is None else f"k{self.topk}"]
        if self.layer_budgets:
            mean = sum(self.layer_budgets) / len(self.layer_budgets)
            parts.append(f"bs{self.block_size}x{mean:g}/layer")
        elif self.block_size:
            parts.append(f"bs{self.block_size}x{self.block_budget}")
        if self.sink_tokens:
            parts.append(f"sink{self.sink_tokens}")
        if self.local_window:
            parts.append(f"win{self.local_window}")
        if self.dense_layers:
            parts.append(f"dense{self.dense_layers}")
        return " ".join(parts)

    def attention(self) -> AttentionConfig:
        budget = max(self.layer_budgets) if self.layer_budgets else self.block_budget
        topk = self.topk
        if topk is None:  # every key of the chosen blocks: top-k never binds
            topk = (budget + 1) * self.block_size
        try:
            return AttentionConfig(
                "topk",
                topk,
                self.block_size,
                budget,
                self.sink_tokens,
                self.local_window,
                self.dense_layers,
                self.layer_budgets,
            )
        except ConfigError as e:
            raise RagtopError(f"bad sparse setting {self.name!r}: {e}") from None


SETTING_KEYS = {
    "k": "topk",
    "bs": "block_size",
    "budget": "block_budget",
    "sink": "sink_tokens",
    "window": "local_window",
    "dense": "dense_layers",
    "budgets": "layer_budgets",
}


def parse_setting(spec: str) -> SparseSetting:
    """ "k=256,bs=32,budget=16,sink=32,window=256,dense=2" (k=all: Quest; bs/budget: blocks;
    budgets=B0/B1/...: one block budget per layer instead of budget)."""
    kw: dict = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        key, sep, val = item.partition("=")
        if not sep or key.strip() not in SETTING_KEYS:
            raise RagtopError(
                f"bad setting item {item!r} in {spec!r}: expected KEY=VALUE with KEY in {', '.join(SETTING_KEYS)}"
            )
        name, val = SETTING_KEYS[key.strip()], val.strip()
        try:
            if name == "layer_budgets":
                kw[name] = tuple(int(b) for b in val.split("/"))
            else:
                kw[name] = None if (name == "topk" and val == "all") else int(val)
        except ValueError:
            raise RagtopError(f"bad value {val!r} for {key} in {spec!r}") from None
    setting = SparseSetting(**kw)
    if setting.topk is None and not setting.block_size:
        raise RagtopError(f"{spec!r}: k=all needs blocks (bs=..., budget=...)")
    if setting.layer_budgets and setting.block_budget is not None:
        raise RagtopError(f"{spec!r}: give budget= (every layer) or budgets= (per layer), not both")
    setting.attention()  # validates
    return setting


def kv_read_fraction(a: AttentionConfig, n_layers: int, context: int) -> float:
    """K/V (and block summary) rows one decode query head reads at `context` tokens, summed
    over the layers, relative to dense attention (2 * context rows per layer).

    exact top-k scores every key and reads the values of the kept ones; block selection
    reads the summaries (min and max) of the eligible earlier blocks, the keys of the chosen
    blocks (counted as if full) and the values of the kept keys; always-kept keys are read
    whole. An upper bound for block selection (chosen blocks may overlap the window).
    Layer budgets (`layer_budgets`) are counted layer by layer.
    """
    if a.kind == "dense":
        return 1.0
    n, p = context, context - 1
    forced = min(n, a.sink_tokens + a.local_window)
    free_hi = p - a.local_window  # not-always-kept keys: sink_tokens <= j <= free_hi
    free = max(0, free_hi - a.sink_tokens + 1)

    def rows(budget: int | None) -> int:
        if a.block_size is None:
            return n + forced + min(a.topk, free)
        bs = a.block_size
        own = p // bs
        eligible = 0 if free == 0 else max(0, min(own - 1, free_hi // bs) - a.sink_tokens // bs + 1)
        own_free = max(0, min(free_hi, p) - max(own * bs, a.sink_tokens) + 1)
        cand = min(free, min(budget, eligible) * bs + own_free)
        return 2 * eligible + forced + cand + forced + min(a.topk, cand)

    total = sum(2 * n if layer < a.dense_layers else rows(a.budget_of(layer)) for layer in range(n_layers))
    return total / (n_layers * 2 * n)


@torch.no_grad()
def run_calibration(
    ckpt: Checkpoint,
    settings: Sequence[SparseSetting | None],
    heldout: Sequence[tuple[str, str]],
    lengths: Sequence[int] = (2048, 4096, 8192),
    passages: int = 2,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Perplexity and KV bytes read per token of each setting (None = dense) at each length.

    Each length scores the first `passages` held-out speeches at least that long, one window
    of exactly that many tokens each. One row per setting (appended to `out` as JSON lines).
    """
    tok = ckpt.tokenizer()
    sep = int(ckpt.generation.get("document_separator_id", ckpt.generation.get("bos_token_id", 0)))
    sets = {n: make_passages(heldout, tok, sep, n, passages) for n in lengths}
    for n, ps in sets.items():
        log(f"{n} tokens: {len(ps)} passage(s): {', '.join(p.title for p in ps)}")
    n_layers = ckpt.config.n_layers
    rows = []
    for s in settings:
        t0 = time.perf_counter()
        attention = AttentionConfig() if s is None else s.attention()
        model = with_attention(ckpt.model, attention)
        row = {"setting": "dense" if s is None else s.name, "attention": attention.to_dict(), "lengths": {}}
        for n, ps in sets.items():
            row["lengths"][str(n)] = {**score(model, ps), "kv_read": kv_read_fraction(attention, n_layers, n)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        _record(row, rows, out, log, format_calibration_row)
    return rows


def format_calibration_row(row: dict) -> str:
    cells = "  ".join(f"{n}: ppl {r['perplexity']:7.3f} kv {r['kv_read']:.3f}" for n, r in row["lengths"].items())
    return f"{row['setting']:<40} {cells}  ({row['seconds']}s)"


def calibration_table(rows: Sequence[dict]) -> str:
    """Markdown: per length, perplexity, its change vs dense, and the KV read vs dense."""
    dense = next((r for r in rows if r["setting"] == "dense"), None)
    lengths = list(rows[0]["lengths"])
    head = "| setting | " + " | ".join(f"{n}: ppl | Δ ppl | KV read" for n in lengths) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(lengths)]
    for r in rows:
        cells = []
        for n in lengths:
            x = r["lengths"].get(n)
            if x is None:
                cells.append("– | – | –")
                continue
            base = dense["lengths"].get(n) if dense else None
            delta = f"{100 * (x['perplexity'] / base['perplexity'] - 1):+.2f}%" if base else "–"
            cells.append(f"{x['perplexity']:.3f} | {delta} | {x['kv_read']:.3f}")
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(rows: Sequence[dict], length: str, path: Path) -> None:
    """Δ perplexity vs KV read at one length, one point per setting (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["setting"] == "dense")["lengths"][length]["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tails = False
    for r in rows:
        x = r["lengths"].get(length)
        if x is None:
            continue
        d = 100 * (x["perplexity"] / dense - 1)
        dot = ax.scatter(x["kv_read"], d, s=18)
        ax.annotate(r["setting"], (x["kv_read"], d), fontsize=6, xytext=(3, 3), textcoords="offset points")
        t = x.get("tail")
        if t is not None and r["setting"] != "dense":  # --runner onnx: the last N tokens after a dense prefill
            tails = True
            ax.scatter(
                x["kv_read"], 100 * (t["dense_prefill"] / t["dense"] - 1), s=24, marker="x", color=dot.get_facecolor()
            )
    if tails:
        ax.scatter([], [], s=18, color="grey", label="all sparse (every token of the windows)")
        ax.scatter([], [], s=24, marker="x", color="grey", label="dense prefill + sparse (last tokens of each window)")
        ax.legend(fontsize=7, loc="upper right")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.25, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("KV bytes read per token / dense")
    ax.set_ylabel("Δ perplexity vs dense (%)")
    ax.set_title(f"sparse settings at {length} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tail_table(rows: Sequence[dict]) -> str:
    """Markdown: the last N tokens of each window, dense vs all sparse vs dense prefill + sparse."""
    rows = [r for r in rows if any("tail" in x for x in r["lengths"].values())]
    if not rows:
        return ""
    lengths = list(rows[0]["lengths"])
    head = "| setting | " + " | ".join(f"{n}: all sparse | dense prefill + sparse" for n in lengths) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(lengths)]
    dense_cells = []
    for n in lengths:
        t = rows[0]["lengths"][n]["tail"]
        dense_cells.append(f"{t['dense']:.3f} | {t['dense']:.3f}")
    lines.append(
        f"| dense (same {rows[0]['lengths'][lengths[0]]['tail']['tokens']} tokens per length) | "
        + " | ".join(dense_cells)
        + " |"
    )
    for r in rows:
        if r["setting"] == "dense":
            continue
        cells = []
        for n in lengths:
            t = r["lengths"].get(n, {}).get("tail")
            if t is None:
                cells.append("– | –")
                continue
            d = t["dense"]
            cells.append(
                f"{t['sparse']:.3f} ({100 * (t['sparse'] / d - 1):+.2f}%) | "
                f"{t['dense_prefill']:.3f} ({100 * (t['dense_prefill'] / d - 1):+.2f}%)"
            )
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- greedy generation (retrieval) --------------------------------------------------------------


if __name__ == "__main__":  # python -m ragtop.convert.sweep ROWS.jsonl [PLOT.png]: the table of (appended) sweeps
    import sys

    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    if rows and "setting" in rows[0]:  # ragtop sweep --setting rows; [PLOT.png] for the Pareto plot
        print(calibration_table(rows))
        if any("tail" in x for r in rows for x in r["lengths"].values()):  # --runner onnx rows
            print("\n" + tail_table(rows))
        if len(sys.argv) > 2:
            pareto_plot(rows, max(rows[0]["lengths"], key=int), Path(sys.argv[2]))
    else:
        print(markdown_table(rows))
