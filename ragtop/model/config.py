"""Typed, frozen model configuration.

A `ModelConfig` fully describes an architecture; it round-trips through `config.json`
with `to_dict` / `from_dict`, which validates every field and raises `ConfigError` with a
message naming the problem.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the problem."""


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention every layer uses.

    kind="dense": causal softmax attention over every visible key.
    kind="topk":  each query keeps only its `topk` highest-scoring visible keys (exact
                  selection); ties are broken towards the earlier key. With
                  `block_size` set, keys are first pre-selected block by block (see
                  `TopKAttention`): blocks whose upper bound of q.k is largest are kept,
                  `block_budget` of them plus the most recent block, then exact top-k runs
                  over the keys of the chosen blocks (a `topk` of at least
                  (block_budget + 1) * block_size keeps every key of the chosen blocks,
                  as Quest does).
    Always-kept keys (top-k only): the first `sink_tokens` tokens (attention sinks) and
    the last `local_window` tokens up to each query are kept on top of the selection; top-k
    and the block budget are spent on the other keys. `dense_layers`: the first N layers
    attend densely (Quest keeps the first two). `layer_budgets`: a block budget per layer
    (layer i keeps layer_budgets[i] blocks; empty: every layer keeps `block_budget`), spent
    where attention is least concentrated (`ragtop allocate-budgets`); `block_budget` is
    then their maximum, so a `topk` of (block_budget + 1) * block_size keeps every key of
    every layer's chosen blocks.
    """

    kind: Literal["dense", "topk"] = "dense"
    topk: int | None = None
    block_size: int | None = None
    block_budget: int | None = None
    sink_tokens: int = 0
    local_window: int = 0
    dense_layers: int = 0
    layer_budgets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.layer_budgets, tuple):  # a JSON list
            try:
                object.__setattr__(self, "layer_budgets", tuple(int(b) for b in self.layer_budgets))
            except (TypeError, ValueError):
                raise ConfigError(f"layer_budgets must be a list of integers, got {self.layer_budgets!r}") from None
        if self.layer_budgets:
            if self.kind != "topk" or self.block_size is None:
                raise ConfigError("layer_budgets needs block selection (kind 'topk' with block_size)")
            if min(self.layer_budgets) < 1:
                raise ConfigError(f"every layer budget must be >= 1, got {list(self.layer_budgets)}")
            if self.block_budget != max(self.layer_budgets):
                raise ConfigError(
                    f"block_budget ({self.block_budget}) must be the largest layer budget ({max(self.layer_budgets)})"
                )
        if self.kind not in ("dense", "topk"):
            raise ConfigError(f"attention kind must be 'dense' or 'topk', got {self.kind!r}")
        if self.kind == "topk":
            if self.topk is None or int(self.topk) < 1:
                raise ConfigError(f"top-k attention needs topk >= 1, got {self.topk!r}")
            if (self.block_size is None) != (self.block_budget is None):
                raise ConfigError("block selection needs both block_size and block_budget")
            if self.block_size is not None and (self.block_size < 1 or self.block_budget < 1):
                raise ConfigError(
                    f"block_size and block_budget must be >= 1, got {self.block_size}, {self.block_budget}"
                )
            for name in ("sink_tokens", "local_window", "dense_layers"):
                if int(getattr(self, name)) < 0:
                    raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        elif any(v is not None for v in (self.topk, self.block_size, self.block_budget)) or any(
            (self.sink_tokens, self.local_window, self.dense_layers)
        ):
            raise ConfigError(
                "dense attention takes no topk / block_size / block_budget / sinks / window / dense_layers"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: `layer_budgets` a list, and left out when empty (as in files written
        before it existed, so their rows compare equal)."""
        d = asdict(self)
        if self.layer_budgets:
            d["layer_budgets"] = list(self.layer_budgets)
        else:
            del d["layer_budgets"]
        return d

    def budget_of(self, layer: int) -> int | None:
        """The block budget of layer `layer` (None without block selection)."""
        return self.layer_budgets[layer] if self.layer_budgets else self.block_budget


@dataclass(frozen=True)
class EmbeddingConfig:
    """Token embedding layout.

    kind="uniform": one table of width d_model.
    kind="ragged":  the vocabulary is split into tiers (most frequent first); tier i holds
                    `tier_sizes[i]` tokens in rows of width `tier_widths[i]`, projected to
                    d_model. Which token sits in which tier is data (`tiers.json`, and
                    the `tier_of` / `row_of` buffers), so any tokenizer works.
    """

    kind: Literal["uniform", "ragged"] = "uniform"
    tier_sizes: tuple[int, ...] = ()
    tier_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tier_sizes", tuple(int(x) for x in self.tier_sizes))
        object.__setattr__(self, "tier_widths", tuple(int(x) for x in self.tier_widths))
        if self.kind not in ("uniform", "ragged"):
            raise ConfigError(f"embedding kind must be 'uniform' or 'ragged', got {self.kind!r}")
        if self.kind == "uniform":
            if self.tier_sizes or self.tier_widths:
                raise ConfigError("uniform embeddings take no tiers")
            return
        if not self.tier_sizes or len(self.tier_sizes) != len(self.tier_widths):
            raise ConfigError(
                f"ragged embeddings need one width per tier, got sizes {self.tier_sizes} and widths {self.tier_widths}"
            )
        if any(s < 1 for s in self.tier_sizes) or any(w < 1 for w in self.tier_widths):
            raise ConfigError(f"tier sizes and widths must be >= 1: {self.tier_sizes}, {self.tier_widths}")


@dataclass(frozen=True)
class ModelConfig:
    """A llama-style decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int | None = None  # default d_model // n_heads
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.attention.layer_budgets and len(self.attention.layer_budgets) != self.n_layers:
            raise ConfigError(
                f"layer_budgets has {len(self.attention.layer_budgets)} entries for {self.n_layers} layers"
            )
        if self.embedding.kind == "ragged" and sum(self.embedding.tier_sizes) != self.vocab_size:
            raise ConfigError(
                f"tiers cover {sum(self.embedding.tier_sizes)} tokens but the vocabulary has "
                f"{self.vocab_size}: tier sizes {self.embedding.tier_sizes} must sum to vocab_size"
            )

    # -- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["embedding"]["tier_sizes"] = list(self.embedding.tier_sizes)
        d["embedding"]["tier_widths"] = list(self.embedding.tier_widths)
        d["attention"] = self.attention.to_dict()  # files written before layer budgets read the same
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        try:
            d["attention"] = AttentionConfig(**d.get("attention", {}))
            d["embedding"] = EmbeddingConfig(**d.get("embedding", {}))
            return cls(**d)
        except TypeError as e:  # missing / unexpected keyword
            raise ConfigError(f"bad model config: {e}") from None

    def with_attention(self, attention: AttentionConfig) -> ModelConfig:
        return replace(self, attention=attention)

    def with_embedding(self, embedding: EmbeddingConfig) -> ModelConfig:
        return replace(self, embedding=embedding)
