"""One-query (decode) attention kernels that read only what they use, for timing.

`TopKAttention` in ragtop.model computes every score and masks: right for training and
for checking semantics, useless for speed. These kernels do per step what a decode
kernel would: dense reads every key and value; exact top-k reads every key but only k
values; block selection reads the per-block min/max summaries, then only the keys of the
chosen blocks and the values of the k winners. Shapes: q [H, Dh], keys/values [H, L, Dh],
summaries [H, nb, Dh]. Same selection rule as `TopKAttention` (own block + `budget`
earlier blocks by upper bound, then exact top-k).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dense_decode(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    s = torch.einsum("hd,hld->hl", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hl,hld->hd", torch.softmax(s, -1), v)


def topk_decode(q: Tensor, k: Tensor, v: Tensor, topk: int) -> Tensor:
    s = torch.einsum("hd,hld->hl", q, k) / math.sqrt(q.shape[-1])
    vals, idx = s.topk(min(topk, s.shape[-1]), dim=-1)  # [H,k]
    vs = v.gather(1, idx[..., None].expand(-1, -1, v.shape[-1]))  # [H,k,Dh]
    return torch.einsum("hk,hkd->hd", torch.softmax(vals, -1), vs)


def block_summaries(k: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Element-wise min and max of each full or partial block of keys: 2 x [H, nb, Dh]."""
    H, L, Dh = k.shape
    nb = -(-L // block)
    pad = nb * block - L
    kb = torch.cat([k, k[:, -1:].expand(H, pad, Dh)], 1) if pad else k  # pad with a real key
    kb = kb.view(H, nb, block, Dh)
    return kb.amin(2), kb.amax(2)


def block_topk_decode(
    q: Tensor, k: Tensor, v: Tensor, kmin: Tensor, kmax: Tensor, block: int, budget: int, topk: int
) -> Tensor:
    H, L, Dh = k.shape
    nb = kmin.shape[1]
    own = nb - 1  # the query is the newest token: its block is the last one
    bound = torch.einsum("hd,hbd->hb", q.clamp(min=0), kmax[:, :own]) + torch.einsum(
        "hd,hbd->hb", q.clamp(max=0), kmin[:, :own]
    )  # [H, nb-1]
    n = min(budget, own)
    chosen = bound.topk(n, dim=-1).indices if n else bound.new_zeros(H, 0, dtype=torch.long)
    chosen = torch.cat([chosen, torch.full((H, 1), own, dtype=torch.long)], 1)  # [H, n+1]
    pos = (chosen[..., None] * block + torch.arange(block)).flatten(1)  # [H, (n+1)*block]
    valid = pos < L
    pos = pos.clamp(max=L - 1)
    ks = k.gather(1, pos[..., None].expand(-1, -1, Dh))  # only the chosen blocks' keys
    s = torch.einsum("hd,hcd->hc", q, ks) / math.sqrt(Dh)
    s = s.masked_fill(~valid, float("-inf"))
    vals, j = s.topk(min(topk, s.shape[-1]), dim=-1)
    idx = pos.gather(1, j)
    vs = v.gather(1, idx[..., None].expand(-1, -1, Dh))
    return torch.einsum("hk,hkd->hd", torch.softmax(vals, -1), vs)
