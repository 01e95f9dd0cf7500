"""The decoder: embedding -> n x (RMSNorm, attention, RMSNorm, SwiGLU) -> RMSNorm -> head.

`Transformer.forward(input_ids)` runs a whole causal sequence (training, evaluation).
`Transformer.forward(input_ids, cache=cache)` appends the new tokens to a `KVCache`, each
sequence at its own length, so one batch can mix sequences of different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import AttnContext, make_attention
from .config import ModelConfig
from .embedding import make_embedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused rms_norm: the exporter lowers it to one ONNX RMSNormalization node at
        # opset >= 23 (instead of Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul)
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions (rotate-half layout, as Hugging Face llama)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:  # [B,S] -> 2 x [B,S,Dh]
        freqs = positions[..., None].float() * self.inv_freq  # [B,S,Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = make_attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, ctx: AttnContext, cache: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class KVCache:
    """Preallocated per-layer key/value buffers and the number of tokens each sequence holds.

    keys[i], values[i]: [B, Hkv, capacity, Dh]; lengths: [B] int64.
    """

    keys: list[Tensor]
    values: list[Tensor]
    lengths: Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype = torch.float32) -> KVCache:
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)],
            values=[torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)],
            lengths=torch.zeros(batch, dtype=torch.long),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = make_embedding(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():  # scaled init of residual-stream writers
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layers) ** 0.5)
            elif name.endswith(
                (
                    "q_proj.weight",
                    "k_proj.weight",
                    "v_proj.weight",
                    "gate_proj.weight",
                    "up_proj.weight",
                    "lm_head.weight",
                )
            ):
                nn.init.normal_(p, std=0.02)

    def forward(
        self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False, dense_rows: Tensor | None = None
    ) -> Tensor:
        """input_ids [B,S] -> logits [B,S,V] (or [B,1,V] with last_only).

        With a cache, token s of sequence b goes to position cache.lengths[b] + s, and the
        lengths advance by S once the pass is done. dense_rows [B] bool: those sequences
        attend to every visible key in top-k layers (the reference of the ONNX op's
        `attention_dense` input: a speculative verification pass).
        """
        B, S = input_ids.shape
        arange = torch.arange(S, device=input_ids.device)
        if cache is None:
            positions = arange.expand(B, S)
            visible = (arange[None, :] <= arange[:, None])[None, None]  # [1,1,S,S]
            write_at = None
        else:
            if int(cache.lengths.max()) + S > cache.capacity:
                raise ValueError(
                    f"KV cache overflow: {int(cache.lengths.max())} + {S} tokens > capacity {cache.capacity}"
                )
            positions = cache.lengths[:, None] + arange  # [B,S]
            keys = torch.arange(cache.capacity, device=input_ids.device)
            visible = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B,1,S,L]
            write_at = cache.lengths
        cos, sin = self.rotary(positions)
        ctx = AttnContext(cos, sin, positions, visible, write_at, causal=cache is None, dense_rows=dense_rows)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, None if cache is None else (cache.keys[i], cache.values[i]))
        if cache is not None:
            cache.lengths = cache.lengths + S
        if last_only:
            x = x[:, -1:]
        return self.logits(self.norm(x))

    def logits(self, h: Tensor) -> Tensor:
        return self.embed.logits(h) if self.lm_head is None else self.lm_head(h)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part: embedding, head (0 when tied), attention, mlp, norms, total."""
        counts = {"embedding": 0, "head": 0, "attention": 0, "mlp": 0, "norm": 0}
        for name, p in self.named_parameters():
            part = name.split(".")[0]
            if part == "embed":
                counts["embedding"] += p.numel()
            elif part == "lm_head":
                counts["head"] += p.numel()
            elif ".attn." in name:
                counts["attention"] += p.numel()
            elif ".mlp." in name:
                counts["mlp"] += p.numel()
            else:
                counts["norm"] += p.numel()
        counts["total"] = sum(counts.values())
        counts["non_embedding"] = counts["total"] - counts["embedding"] - counts["head"]
        return counts
