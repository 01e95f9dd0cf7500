"""Model layers that run the Triton kernels, and `TritonPath`, which installs them in a model.

`TritonBlockTopKAttention` is `TopKAttention` with block selection whose decode steps (one
new token per sequence) run `block_topk_decode` over block summaries it keeps up to date
for the runner's cache; prefill chunks (several new tokens) run the reference code, which
is already batched GPU work, and only refresh the summaries. `TritonRaggedEmbedding` is
`RaggedEmbedding` whose lookup is `ragged_embedding`. Both keep their parent's parameters
and state-dict names, so a checkpoint loads into either.

Exact top-k (no blocks) and dense layers stay as they are: their decode reads every key,
which torch's own kernels (SDPA, matmul) already do at memory speed.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..model import Transformer
from ..model.attention import AttnContext, TopKAttention
from ..model.config import ModelConfig
from ..model.embedding import RaggedEmbedding
from .kernels import (
    MAX_CANDIDATES,
    block_topk_decode,
    decode_candidates,
    ragged_embedding,
    update_block_summaries,
)


class TritonBlockTopKAttention(TopKAttention):
    """Block-selection top-k attention whose decode runs the Triton kernels.

    The summaries cover the runner's whole cache ([slots, Hkv, ceil(capacity / bs), Dh]);
    `rows` is the slot range of the next model call (the runner passes the model views of
    those rows of its buffers).
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__(cfg, layer)
        if self.block_size is None:
            raise ValueError("TritonBlockTopKAttention needs block selection (block_size and block_budget)")
        self.kmin: Tensor | None = None
        self.kmax: Tensor | None = None
        self.rows = slice(0, 0)

    def allocate_summaries(self, slots: int, capacity: int, like: Tensor) -> None:
        nb = -(-capacity // self.block_size)
        shape = (slots, self.n_kv_heads, nb, self.head_dim)
        self.kmin = like.new_zeros(shape)
        self.kmax = like.new_zeros(shape)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        if self.kmin is None or self.kmax is None or ctx.write_at is None:  # no runner cache: reference
            return super().attend(q, k, v, ctx)
        kmin, kmax = self.kmin[self.rows], self.kmax[self.rows]
        if kmin.shape[0] != k.shape[0]:
            raise ValueError(f"block summaries are bound to {kmin.shape[0]} cache rows, this call has {k.shape[0]}")
        S = q.shape[2]
        update_block_summaries(k, kmin, kmax, ctx.write_at, S, self.block_size)
        if S > 1 or decode_candidates(self.block_size, self.block_budget, k.shape[2]) > MAX_CANDIDATES:
            return super().attend(q, k, v, ctx)  # prefill; or a budget too large for one program
        out = block_topk_decode(
            q[:, :, 0],
            k,
            v,
            kmin,
            kmax,
            ctx.positions[:, 0],
            topk=self.topk,
            block_size=self.block_size,
            block_budget=self.block_budget,
            scale=self.scale,
            sink_tokens=self.sink_tokens,
            local_window=self.local_window,
        )
        return out[:, :, None]  # [B,H,1,Dh]


class TritonRaggedEmbedding(RaggedEmbedding):
    """RaggedEmbedding whose lookup (gather + projection) is one Triton launch per tier."""

    def forward(self, ids: Tensor) -> Tensor:  # [B,S] -> [B,S,D]
        return ragged_embedding(ids, self.tier_of, self.row_of, list(self.tables), [p.weight for p in self.projs])


def _replace(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` holding `old`'s very tensors (no copy, same device and dtype)."""
    new.load_state_dict(old.state_dict(), assign=True)
    return new.train(old.training)


class TritonPath:
    """The Triton kernels installed in a model, and the block summaries of a runner's cache.

    A runner calls `allocate` with its cache, `bind_rows` before every model call (the slot
    range of that call) and `copy_slot` when it copies a cached prefix between slots.
    """

    def __init__(self, model: Transformer) -> None:
        cfg = model.config
        self.attention: list[TritonBlockTopKAttention] = []
        for i, layer in enumerate(model.layers):
            if type(layer.attn) is TopKAttention and layer.attn.block_size is not None:
                layer.attn = _replace(layer.attn, TritonBlockTopKAttention(cfg, i))
                self.attention.append(layer.attn)
        self.embedding = type(model.embed) is RaggedEmbedding
        if self.embedding:
            model.embed = _replace(model.embed, TritonRaggedEmbedding(cfg))

    def allocate(self, slots: int, capacity: int) -> None:
        for attn in self.attention:
            attn.allocate_summaries(slots, capacity, attn.q_proj.weight)

    def release(self) -> None:
        """Free the summaries (the runner closed its cache)."""
        for attn in self.attention:
            attn.kmin = attn.kmax = None

    def bind_rows(self, lo: int, hi: int) -> None:
        for attn in self.attention:
            attn.rows = slice(lo, hi)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the summaries of the blocks holding keys [0, length). A last, partial block may
        carry src's later keys: dst's next write recomputes that block from its first key."""
        for attn in self.attention:
            assert attn.kmin is not None and attn.kmax is not None
            n = -(-length // attn.block_size)
            attn.kmin[dst, :, :n] = attn.kmin[src, :, :n]
            attn.kmax[dst, :, :n] = attn.kmax[src, :, :n]
