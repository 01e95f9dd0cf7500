"""Training-free conversion of a dense model: top-k attention and ragged embeddings.

Top-k attention keeps every weight; only `config.attention` changes (optionally with
Quest-style block pre-selection).

Ragged embeddings: tokens are ranked by frequency in a corpus, cut into tiers (most
frequent first) by a tier spec such as "4096:576,16384:192,*:64" (tier sizes in tokens,
"*" = the rest of the vocabulary, and row widths), and each tier's rows of the dense
[V, D] table are compressed by truncated SVD:

    rows_i [n_i, D] ~= U_i S_i [n_i, d_i]  @  V_i^T [d_i, D]
                       table_i                proj_i.weight^T   (Linear(d_i -> D).weight: [D, d_i])

With a tied head, RaggedEmbedding.logits scores tier i as (h @ proj_i.weight) @ table_i^T,
which is h @ rows_i^T again: input and output follow the same tiers. A tier of full rank
(d_i >= min(n_i, D)) is reproduced exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import RagtopError
from ..model import AttentionConfig, ConfigError, EmbeddingConfig, RaggedEmbedding, Transformer
from ..train.tiers import token_counts


def with_attention(model: Transformer, attention: AttentionConfig) -> Transformer:
    """The same weights under another attention config (dense <-> top-k share parameters)."""
    try:
        cfg = model.config.with_attention(attention)
    except ConfigError as e:  # e.g. a layer budget per layer of another model
        raise RagtopError(f"bad attention for this model: {e}") from None
    new = Transformer(cfg)
    new.load_state_dict(model.state_dict(), strict=True)
    return new.eval()


def topk_attention(
    topk: int,
    block_size: int | None = None,
    block_budget: int | None = None,
    sink_tokens: int = 0,
    local_window: int = 0,
    dense_layers: int = 0,
    layer_budgets: tuple[int, ...] = (),
) -> AttentionConfig:
    """layer_budgets: one block budget per layer (block_budget then defaults to their maximum)."""
    if layer_budgets and block_budget is None:
        block_budget = max(layer_budgets)
    try:
        return AttentionConfig(
            "topk", topk, block_size, block_budget, sink_tokens, local_window, dense_layers, tuple(layer_budgets)
        )
    except ConfigError as e:
        raise RagtopError(f"bad top-k attention options: {e}") from None


@dataclass(frozen=True)
class TierSpec:
    """Tier sizes (None = the rest of the vocabulary, last tier only) and row widths."""

    sizes: tuple[int | None, ...]
    widths: tuple[int, ...]

    def __str__(self) -> str:
        return ",".join(f"{'*' if n is None else n}:{w}" for n, w in zip(self.sizes, self.widths, strict=True))

    def resolve(self, vocab_size: int, d_model: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(sizes, widths) for this vocabulary; widths are capped at min(n_i, d_model)."""
        fixed = sum(n for n in self.sizes if n is not None)
        rest = vocab_size - fixed
        if rest < 0 or (rest == 0 and None in self.sizes) or (rest > 0 and None not in self.sizes):
            raise RagtopError(
                f"tier spec {self} does not cover the vocabulary of {vocab_size} tokens exactly "
                "(end it with '*:WIDTH' to put the remaining tokens in the last tier)"
            )
        sizes = tuple(rest if n is None else n for n in self.sizes)
        if any(w > d_model for w in self.widths):
            raise RagtopError(f"tier spec {self}: a width exceeds the model width {d_model}")
        return sizes, tuple(min(w, n) for n, w in zip(sizes, self.widths, strict=True))


def parse_tiers(spec: str) -> TierSpec:
    """Parse "SIZE:WIDTH,...,*:WIDTH" (sizes in tokens, most frequent tier first)."""
    sizes: list[int | None] = []
    widths: list[int] = []
    items = [s.strip() for s in spec.split(",") if s.strip()]
    for i, item in enumerate(items):
        n, sep, w = item.partition(":")
        try:
            if not sep:
                raise ValueError
            size = None if n.strip() == "*" else int(n)
            width = int(w)
        except ValueError:
            raise RagtopError(
                f"bad tier {item!r} in {spec!r}: expected SIZE:WIDTH or *:WIDTH, e.g. 4096:576,*:64"
            ) from None
        if size is None and i != len(items) - 1:
            raise RagtopError(f"bad tier spec {spec!r}: only the last tier may be '*'")
        if (size is not None and size < 1) or width < 1:
            raise RagtopError(f"bad tier {item!r} in {spec!r}: sizes and widths must be >= 1")
        sizes.append(size)
        widths.append(width)
    if not items:
        raise RagtopError("empty tier spec: expected SIZE:WIDTH,...,*:WIDTH")
    return TierSpec(tuple(sizes), tuple(widths))


def corpus_counts(texts: Iterable[str], tokenizer, vocab_size: int) -> np.ndarray:
    """How often each token id occurs when `tokenizer` (HF tokenizers) encodes `texts`."""
    return token_counts((enc.ids for enc in tokenizer.encode_batch(list(texts))), vocab_size)


def frequency_tiers(counts: np.ndarray, sizes: Sequence[int]) -> list[list[int]]:
    """Token ids by descending count (ties: lower id first), cut into tiers of `sizes`."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    bounds = np.cumsum([0, *sizes])
    return [order[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def svd_compress(rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [n, D] -> (table [n, width], proj_weight [D, width]) with table @ proj_weight.T ~= rows."""
    u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)  # u [n,r], s [r], vh [r,D]
    table = u[:, :width] * s[:width]
    return table.to(rows.dtype), vh[:width].t().contiguous().to(rows.dtype)


def to_ragged(model: Transformer, tiers: Sequence[Sequence[int]], widths: Sequence[int]) -> Transformer:
    """Replace the uniform embedding (and the tied head) by SVD-compressed frequency tiers.

    A width above min(tier size, d_model) adds nothing and is capped there.
    """
    if isinstance(model.embed, RaggedEmbedding):
        raise RagtopError("the model already has ragged embeddings")
    dense = model.embed.weight.detach()  # [V, D]
    widths = [min(w, len(ids), dense.shape[1]) for ids, w in zip(tiers, widths, strict=True)]  # rank bound
    cfg = model.config.with_embedding(EmbeddingConfig("ragged", tuple(len(t) for t in tiers), tuple(widths)))
    new = Transformer(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embed.")}
    new.load_state_dict(state, strict=False)  # embed.* are filled below
    new.embed.set_tiers(tiers)
    with torch.no_grad():
        for i, (ids, width) in enumerate(zip(tiers, widths, strict=True)):
            table, proj = svd_compress(dense[torch.as_tensor(list(ids))], width)
            new.embed.tables[i].copy_(table)
            new.embed.projs[i].weight.copy_(proj)
    return new.eval()


def tier_mass(counts: np.ndarray, tiers: Sequence[Sequence[int]]) -> list[float]:
    """Share of the counted tokens that falls in each tier."""
    total = max(int(counts.sum()), 1)
    return [float(counts[list(t)].sum()) / total for t in tiers]
