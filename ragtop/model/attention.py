"""Attention variants: one class per variant, sharing projections and the KV-cache write.

Shapes: B batch, S new tokens, L keys (cache capacity or S), H query heads, G = H / Hkv
query heads per key/value head, Dh head dim.

Visibility: query s of sequence b sits at position p = offset[b] + s and sees key j iff
j <= p. Keys at or beyond a sequence's written length are never visible to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

# Rows of queries scored at once by top-k attention: bounds the score matrix to
# B x H x Q_CHUNK x L floats, so long inputs never materialise an L x L matrix per head.
Q_CHUNK = 128


@dataclass
class AttnContext:
    """What every layer of one forward pass shares."""

    cos: Tensor  # [B, S, Dh]
    sin: Tensor  # [B, S, Dh]
    positions: Tensor  # [B, S] absolute position of each new token
    visible: Tensor  # [B, 1, S, L] bool: key j visible to query s
    write_at: Tensor | None  # [B] cache slot of the first new token (None: no cache)
    causal: bool  # True when there is no cache: visible is the plain causal mask
    dense_rows: Tensor | None = None  # [B] bool: these sequences attend densely (ops.py attention_dense)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, S, Dh]; cos/sin: [B, S, Dh] (Hugging Face's rotate-half convention)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of each row's k largest entries; ties go to the lower index.

    Entries equal to -inf may be included when a row has fewer than k finite entries:
    callers AND the result with their visibility mask.
    """
    k = min(k, scores.shape[-1])
    thresh = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > thresh
    tied = scores == thresh
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def select_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax weights and key indices of each row's top-k scores ([.., L] -> 2 x [.., k']).

    Ties at the k-th place go to the lower key index (as `topk_mask`). torch.topk gives no
    such promise, so rows whose k-th score ties with a score left out are re-selected
    exactly; that only happens with exactly equal finite scores. Rows with fewer than k
    visible keys pad with -inf scores, whose weight is 0.
    """
    k = min(k, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1)
    kth = vals[..., -1:]
    straddle = torch.isfinite(kth) & ((scores == kth).sum(-1, keepdim=True) > (vals == kth).sum(-1, keepdim=True))
    if bool(straddle.any()):
        keep = topk_mask(scores, k)  # exactly k True per row, in key order
        idx = torch.where(straddle, keep.nonzero()[:, -1].view(*scores.shape[:-1], k), idx)
        vals = scores.gather(-1, idx)
    return torch.softmax(vals, dim=-1), idx


class Attention(nn.Module):
    """Projections, rotary embedding and KV-cache write; subclasses define `attend`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project(self, x: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        """q [B,H,S,Dh], k and v [B,Hkv,S,Dh] of the new tokens, rotary applied to q and k."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin), v

    def forward(self, x: Tensor, ctx: AttnContext, cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, S, _ = x.shape
        q, k, v = self.project(x, ctx)
        if cache is not None:
            k, v = write_cache(cache, k, v, ctx.write_at)  # [B,Hkv,L,Dh], updated in place
        out = self.attend(q, k, v, ctx)  # [B,H,S,Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        raise NotImplementedError

    def expand_kv(self, t: Tensor) -> Tensor:
        """[B, Hkv, L, Dh] -> [B, H, L, Dh] (grouped-query attention)."""
        g = self.n_heads // self.n_kv_heads
        return t if g == 1 else t.repeat_interleave(g, dim=1)


def write_cache(cache: tuple[Tensor, Tensor], k: Tensor, v: Tensor, write_at: Tensor) -> tuple[Tensor, Tensor]:
    """Write the new keys/values of each sequence at its own offset; returns the full buffers.
    A cache of a narrower float type (e.g. float16 under float32 activations) stores the rows
    rounded to its type, and attention reads the stored rows in the activations' type."""
    keys, values = cache  # [B, Hkv, L, Dh]
    B, Hkv, S, Dh = k.shape
    idx = write_at[:, None] + torch.arange(S, device=k.device)  # [B, S]
    idx = idx[:, None, :, None].expand(B, Hkv, S, Dh)
    keys.scatter_(2, idx, k.to(keys.dtype))
    values.scatter_(2, idx, v.to(values.dtype))
    return keys.to(k.dtype), values.to(v.dtype)


class DenseAttention(Attention):
    """Softmax attention over every visible key."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        k, v = self.expand_kv(k), self.expand_kv(v)
        if ctx.causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.visible, scale=self.scale)


class TopKAttention(Attention):
    """Each query attends to its `topk` highest-scoring visible keys (exact selection).

    Always-kept keys: query p keeps key j regardless of its score when j < `sink_tokens`
    (attention sinks) or j > p - `local_window` (its local window); the top-k then runs over
    the other visible keys and the softmax over both sets. With no sinks and no window this
    is plain top-k.

    Optional block selection (`block_size`, `block_budget`): keys are grouped in blocks of
    `block_size`; each block keeps the element-wise min and max of its keys, which give an
    upper bound of q.k over the block: sum_d max(q_d * kmin_d, q_d * kmax_d). Each query
    keeps its own block plus the `block_budget` earlier *eligible* blocks with the largest
    bound (ties: lower block), a block being eligible when it holds a key that is not
    always kept (blocks wholly inside the sinks or the window are not worth a budget slot).
    Exact top-k then runs over the not-always-kept visible keys of the chosen blocks (a
    `topk` >= (block_budget + 1) * block_size keeps all of them: Quest). A budget covering
    every block is exactly `TopKAttention` without blocks.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__(cfg)
        a = cfg.attention
        self.topk, self.block_size, self.block_budget = a.topk, a.block_size, a.budget_of(layer)
        self.sink_tokens, self.local_window = a.sink_tokens, a.local_window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        k, v = self.expand_kv(k), self.expand_kv(v)  # [B,H,L,Dh]
        summaries = self.block_summaries(k, ctx) if self.block_size is not None else None
        outs = []
        for s0 in range(0, q.shape[2], Q_CHUNK):  # bounded score memory for long inputs
            qc, ac = q[:, :, s0 : s0 + Q_CHUNK], ctx.visible[:, :, s0 : s0 + Q_CHUNK]
            pos = ctx.positions[:, None, s0 : s0 + Q_CHUNK, None]  # [B,1,c,1]
            end = int(pos.max()) + 1  # no query here sees keys >= end
            kc, vc, ac = k[:, :, :end], v[:, :, :end], ac[..., :end]
            j = torch.arange(end, device=q.device)
            forced = ac & ((j < self.sink_tokens) | (j > pos - self.local_window))  # [B,1,c,end]
            cand = ac & ~forced
            if summaries is not None:
                cand = cand & self.block_selection(qc, pos, summaries)[..., :end]
            scores = (qc * self.scale) @ kc.transpose(-1, -2)  # [B,H,c,end]
            if summaries is not None and self.topk >= (self.block_budget + 1) * self.block_size:
                keep = cand | forced  # top-k cannot bind: every candidate of the chosen blocks (Quest)
            else:
                _, idx = select_topk(scores.masked_fill(~cand, float("-inf")), self.topk)  # [B,H,c,k]
                keep = torch.zeros_like(cand.expand_as(scores)).scatter(-1, idx, True) & cand | forced
            if ctx.dense_rows is not None:  # a verification pass: every visible key
                keep = torch.where(ctx.dense_rows[:, None, None, None], ac, keep)
            probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
            outs.append(probs @ vc)
        return torch.cat(outs, dim=2)

    def block_summaries(self, k: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor]:
        """Element-wise min and max of each block's written keys ([B,H,nb,Dh] each; zero for
        blocks holding no key that a query of this call can see)."""
        bs, L = self.block_size, k.shape[2]
        nb = -(-L // bs)
        written = ctx.visible.any(dim=2)  # [B,1,L]: keys some query of this call can see
        pad = nb * bs - L
        kb = F.pad(k, (0, 0, 0, pad)).view(*k.shape[:2], nb, bs, k.shape[-1])  # [B,H,nb,bs,Dh]
        valid = F.pad(written, (0, pad)).view(written.shape[0], 1, nb, bs, 1)
        kmin = torch.where(valid, kb, torch.inf).amin(3)  # [B,H,nb,Dh]
        kmax = torch.where(valid, kb, -torch.inf).amax(3)
        any_valid = valid.any(3)  # [B,1,nb,1]
        return kmin.where(any_valid, 0.0), kmax.where(any_valid, 0.0)

    def block_selection(self, q: Tensor, pos: Tensor, summaries: tuple[Tensor, Tensor]) -> Tensor:
        """[B,H,c,nb*bs] bool: keys in the blocks chosen by queries q [B,H,c,Dh] at pos [B,1,c,1]."""
        bound, own, earlier = block_bounds(q, pos, *summaries, self.block_size, self.sink_tokens, self.local_window)
        chosen = (topk_mask(bound, self.block_budget) & earlier) | own  # [B,H,c,nb]
        return chosen.repeat_interleave(self.block_size, dim=-1)


def block_bounds(
    q: Tensor, pos: Tensor, kmin: Tensor, kmax: Tensor, block_size: int, sink_tokens: int, local_window: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Block selection's ranking: (bound, own, eligible). bound [..., nb] is the upper bound of
    q.k over each block, sum_d max(q_d * kmin_d, q_d * kmax_d), -inf where not eligible; own
    marks the query's own block; eligible an earlier block holding a key j with
    sink_tokens <= j <= pos - local_window. q [..., Dh] (e.g. [B,H,c,Dh]), pos broadcasting
    to q's leading axes with a trailing 1 (e.g. [B,1,c,1]), kmin/kmax [..., nb, Dh]."""
    bs, nb = block_size, kmin.shape[-2]
    bound = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)
    start = torch.arange(nb, device=q.device) * bs
    own = start == pos // bs * bs
    free = start.clamp(min=sink_tokens) <= torch.minimum(start + bs - 1, pos - local_window)
    eligible = (start <= pos) & ~own & free
    return bound.masked_fill(~eligible, float("-inf")), own, eligible


def make_attention(cfg: ModelConfig, layer: int = 0) -> Attention:
    """The attention of layer `layer`: dense in the first `dense_layers` layers of a top-k model."""
    if cfg.attention.kind == "topk" and layer < cfg.attention.dense_layers:
        return DenseAttention(cfg)
    if cfg.attention.kind == "topk":
        return TopKAttention(cfg, layer)
    return DenseAttention(cfg)
