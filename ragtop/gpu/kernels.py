"""Triton kernels with the semantics of the onnxruntime plugin (plugins/onnxruntime/ragtop_ort.cc)
and of the PyTorch reference (ragtop/model/attention.py, embedding.py).

Three operations, each a launch function over torch tensors:

- `update_block_summaries`: after new keys are written at [start[b], start[b] + S), recompute
  the element-wise min/max of every block they touch, from the block's first key up to the
  new end. Recomputing (instead of folding the new keys into the old summary) makes the
  summaries exact for whatever the cache holds, even after a runner wrote garbage past an
  idle row's length: the next real write to that block recomputes it from its start.
- `block_topk_decode`: one new query per sequence (decode) with block selection. Two
  launches: `_block_bounds_kernel` scores every block summary against the query heads that
  share a KV head (GQA: each summary tile is loaded once for the whole group); then
  `_block_decode_kernel`, one program per (sequence, query head), picks its blocks, scores
  only their keys, keeps the top-k candidates plus the always-kept keys (sinks, local
  window), and takes the softmax-weighted sum of only those value rows.
- `ragged_embedding`: out[t] = proj_i @ table_i[row_of[id_t]] for the tier i of id_t, one
  launch per tier, each token written by exactly one of them.

Selection rule, as everywhere in ragtop: the K largest values, ties going to the lower
index. `_topk_keep` finds the K-th largest by a 32-step binary search over the floats' bit
patterns (mapped to order-preserving integers), so its cost does not grow with K (the
served default keeps 256 keys), then admits tied values in index order with a cumsum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Candidate keys one decode program scores and selects from in registers ((budget + 1) blocks,
# each padded to a power of two). Settings beyond it (a budget of hundreds of blocks) are
# refused here; TritonBlockTopKAttention runs the reference code for them instead.
MAX_CANDIDATES = 16384


def decode_candidates(block_size: int, block_budget: int, length: int) -> int:
    """Candidate slots `block_topk_decode` holds per query for a cache of `length` keys."""
    return (min(block_budget, triton.cdiv(length, block_size)) + 1) * _p2(block_size)


def _p2(n: int, least: int = 2) -> int:
    """Next power of two >= max(n, least): Triton tiles have power-of-two sizes."""
    return max(least, triton.next_power_of_2(max(1, n)))


@triton.jit
def _topk_keep(x, valid, K):
    """Mask of the K largest valid entries of the 1-D tensor x (ties: lower position)."""
    keep = valid
    if tl.sum(valid.to(tl.int32), 0) > K:  # else every valid entry is kept
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 are equal scores: one bit pattern
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # same order as x
        lo = tl.min(key, 0)
        hi = tl.max(key, 0)
        for _ in range(32):  # largest t with count(key >= t) >= K: the K-th largest key
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((valid & (key >= mid)).to(tl.int32), 0) >= K
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        above = valid & (key > lo)
        tied = valid & (key == lo)
        room = K - tl.sum(above.to(tl.int32), 0)
        keep = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))
    return keep


# -- block summaries -------------------------------------------------------------------
@triton.jit
def _summary_update_kernel(
    k_ptr,
    kmin_ptr,
    kmax_ptr,
    start_ptr,
    S,
    HKV,
    skb,
    skh,
    skl,
    ssb,
    ssh,
    ssn,
    BS: tl.constexpr,
    BS_P2: tl.constexpr,
    DH: tl.constexpr,
    DH_P2: tl.constexpr,
):
    pid, t = tl.program_id(0), tl.program_id(1)  # (sequence, KV head), t-th touched block
    b, h = (pid // HKV).to(tl.int64), pid % HKV
    end = tl.load(start_ptr + b) + S
    blk = tl.load(start_ptr + b) // BS + t
    first = blk * BS
    if first < end:
        r = tl.arange(0, BS_P2)
        d = tl.arange(0, DH_P2)
        mask = ((r < BS) & (first + r < end))[:, None] & (d < DH)[None, :]
        keys = tl.load(k_ptr + b * skb + h * skh + (first + r)[:, None] * skl + d[None, :], mask=mask, other=0.0)
        kmin = tl.min(tl.where(mask, keys, float("inf")), axis=0)
        kmax = tl.max(tl.where(mask, keys, float("-inf")), axis=0)
        at = b * ssb + h * ssh + blk * ssn + d
        tl.store(kmin_ptr + at, kmin.to(kmin_ptr.dtype.element_ty), mask=d < DH)
        tl.store(kmax_ptr + at, kmax.to(kmax_ptr.dtype.element_ty), mask=d < DH)


def update_block_summaries(
    keys: Tensor, kmin: Tensor, kmax: Tensor, start: Tensor, new_tokens: int, block_size: int
) -> None:
    """Recompute, in place, the summaries of the blocks touched by keys [start[b], start[b] + S).

    keys [B, Hkv, L, Dh] (any strides, last dim contiguous); kmin/kmax [B, Hkv, nb, Dh] with
    nb >= ceil(L / block_size); start [B] int64; S = new_tokens.
    """
    B, Hkv, _, Dh = keys.shape
    _check_last_dim_contiguous(keys=keys, kmin=kmin, kmax=kmax)
    if kmin.stride() != kmax.stride():
        raise ValueError("kmin and kmax must have the same layout")
    touched = (new_tokens + block_size - 2) // block_size + 1  # most blocks S keys can straddle
    _summary_update_kernel[(B * Hkv, touched)](
        keys,
        kmin,
        kmax,
        start.contiguous(),
        new_tokens,
        Hkv,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        kmin.stride(0),
        kmin.stride(1),
        kmin.stride(2),
        BS=block_size,
        BS_P2=_p2(block_size),
        DH=Dh,
        DH_P2=_p2(Dh),
    )


# -- block-selection decode ----------------------------------------------------------------
@triton.jit
def _block_bounds_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    pos_ptr,
    bound_ptr,
    HKV,
    NB,
    SINK,
    WINDOW,
    sqb,
    sqh,
    ssb,
    ssh,
    ssn,
    sbb,
    sbh,
    G: tl.constexpr,
    G_P2: tl.constexpr,
    BS: tl.constexpr,
    TILE: tl.constexpr,
    DH: tl.constexpr,
    DH_P2: tl.constexpr,
):
    """bound[b, h, n] = sum_d max(q_d kmin_d, q_d kmax_d) for the eligible earlier blocks n, else -inf."""
    pid, tile = tl.program_id(0), tl.program_id(1)
    b, kvh = (pid // HKV).to(tl.int64), pid % HKV
    p = tl.load(pos_ptr + b)
    g = tl.arange(0, G_P2)
    d = tl.arange(0, DH_P2)
    n = tile * TILE + tl.arange(0, TILE)
    q = tl.load(
        q_ptr + b * sqb + (kvh * G + g)[:, None] * sqh + d[None, :],
        mask=(g < G)[:, None] & (d < DH)[None, :],
        other=0.0,
    ).to(tl.float32)  # [G, Dh], unscaled
    smask = (n < NB)[:, None] & (d < DH)[None, :]
    at = b * ssb + kvh * ssh + n[:, None] * ssn + d[None, :]
    lo = tl.load(kmin_ptr + at, mask=smask, other=0.0).to(tl.float32)  # [TILE, Dh]: once for the group
    hi = tl.load(kmax_ptr + at, mask=smask, other=0.0).to(tl.float32)
    bound = tl.sum(tl.maximum(q[:, None, :] * lo[None, :, :], q[:, None, :] * hi[None, :, :]), axis=2)  # [G, TILE]
    start = n * BS
    own = start == p // BS * BS
    # eligible: an earlier block holding a candidate j, SINK <= j <= p - WINDOW
    free = tl.maximum(start, SINK) <= tl.minimum(start + BS - 1, p - WINDOW)
    earlier = (start <= p) & (n < NB) & ~own & free
    bound = tl.where(earlier[None, :], bound, float("-inf"))
    tl.store(
        bound_ptr + b * sbb + (kvh * G + g)[:, None] * sbh + n[None, :],
        bound,
        mask=(g < G)[:, None] & (n < NB)[None, :],
    )


@triton.jit
def _block_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bound_ptr,
    pos_ptr,
    sel_ptr,
    w_ptr,
    out_ptr,
    H,
    NB,
    scale,
    sqb,
    sqh,
    skb,
    skh,
    skl,
    svb,
    svh,
    svl,
    sbb,
    sbh,
    sob,
    soh,
    G: tl.constexpr,
    TOPK: tl.constexpr,
    BUDGET: tl.constexpr,
    BS: tl.constexpr,
    SINK: tl.constexpr,
    WINDOW: tl.constexpr,
    DH: tl.constexpr,
    DH_P2: tl.constexpr,
    BS_P2: tl.constexpr,
    NB_P2: tl.constexpr,
    SEL_P2: tl.constexpr,
    CAND_P2: tl.constexpr,
    SINK_P2: tl.constexpr,
    WIN_P2: tl.constexpr,
):
    """One (sequence, query head): choose blocks, score their candidates, top-k, softmax, values.

    Scratch (`sel`: chosen blocks, `w`: candidate scores, then weights) is written and read
    back by the same program across a barrier; the reads bypass L1 (`.cg`), so no thread can
    see a stale line of what another thread of the program just wrote.
    """
    pid = tl.program_id(0)
    b, h = (pid // H).to(tl.int64), pid % H
    kvh = h // G
    p = tl.load(pos_ptr + b)
    d = tl.arange(0, DH_P2)
    dmask = d < DH
    qs = tl.load(q_ptr + b * sqb + h * sqh + d, mask=dmask, other=0.0).to(tl.float32) * scale
    k_row = k_ptr + b * skb + kvh * skh
    v_row = v_ptr + b * svb + kvh * svh

    # 1. blocks: the BUDGET best eligible bounds (ties: lower block) plus the own block,
    #    written in increasing order so candidates come in key order (the tie rule below)
    n = tl.arange(0, NB_P2)
    bound = tl.load(bound_ptr + b * sbb + h * sbh + n, mask=n < NB, other=float("-inf"))
    chosen = _topk_keep(bound, bound > float("-inf"), BUDGET) | (n == p // BS)
    n_sel = tl.sum(chosen.to(tl.int32), 0)
    tl.store(sel_ptr + pid * SEL_P2 + tl.cumsum(chosen.to(tl.int32), 0) - 1, n, mask=chosen)
    tl.debug_barrier()

    # 2. scores of the candidates (visible, not always kept) of the chosen blocks
    c = tl.arange(0, BS_P2)
    for i in range(BUDGET + 1):
        blk = tl.load(sel_ptr + pid * SEL_P2 + i, mask=i < n_sel, other=0, cache_modifier=".cg")
        j = blk * BS + c
        live = tl.full([BS_P2], i, tl.int32) < n_sel  # a tensor: scalar & tensor masks trip the interpreter
        cand = live & (c < BS) & (j <= p) & (j >= SINK) & (j <= p - WINDOW)
        kt = tl.load(k_row + j[:, None] * skl + d[None, :], mask=cand[:, None] & dmask[None, :], other=0.0)
        s = tl.sum(kt.to(tl.float32) * qs[None, :], axis=1)
        tl.store(w_ptr + pid * CAND_P2 + i * BS_P2 + c, tl.where(cand, s, float("-inf")))
    tl.debug_barrier()

    # 3. always-kept keys: sinks j < SINK, window p - WINDOW < j <= p (not counted twice)
    js = tl.arange(0, SINK_P2)
    sink = (js < SINK) & (js <= p)
    ks = tl.load(k_row + js[:, None] * skl + d[None, :], mask=sink[:, None] & dmask[None, :], other=0.0)
    s_sink = tl.where(sink, tl.sum(ks.to(tl.float32) * qs[None, :], axis=1), float("-inf"))
    jw = p - WINDOW + 1 + tl.arange(0, WIN_P2)
    win = (tl.arange(0, WIN_P2) < WINDOW) & (jw >= 0) & (jw >= SINK) & (jw <= p)
    kw = tl.load(k_row + jw[:, None] * skl + d[None, :], mask=win[:, None] & dmask[None, :], other=0.0)
    s_win = tl.where(win, tl.sum(kw.to(tl.float32) * qs[None, :], axis=1), float("-inf"))

    # 4. top-k of the candidates, softmax over them and the always-kept keys
    cc = tl.arange(0, CAND_P2)
    s = tl.load(w_ptr + pid * CAND_P2 + cc, mask=cc < (BUDGET + 1) * BS_P2, other=float("-inf"), cache_modifier=".cg")
    keep = _topk_keep(s, s > float("-inf"), TOPK)
    m = tl.maximum(tl.max(tl.where(keep, s, float("-inf")), 0), tl.maximum(tl.max(s_sink, 0), tl.max(s_win, 0)))
    w = tl.where(keep, tl.exp(s - m), 0.0)
    w_sink = tl.where(sink, tl.exp(s_sink - m), 0.0)
    w_win = tl.where(win, tl.exp(s_win - m), 0.0)
    total = tl.sum(w, 0) + tl.sum(w_sink, 0) + tl.sum(w_win, 0)
    tl.store(w_ptr + pid * CAND_P2 + cc, w, mask=cc < (BUDGET + 1) * BS_P2)
    tl.debug_barrier()

    # 5. weighted sum of only the kept value rows
    vs = tl.load(v_row + js[:, None] * svl + d[None, :], mask=sink[:, None] & dmask[None, :], other=0.0)
    vw = tl.load(v_row + jw[:, None] * svl + d[None, :], mask=win[:, None] & dmask[None, :], other=0.0)
    acc = tl.sum(w_sink[:, None] * vs.to(tl.float32), axis=0) + tl.sum(w_win[:, None] * vw.to(tl.float32), axis=0)
    for i in range(BUDGET + 1):
        blk = tl.load(sel_ptr + pid * SEL_P2 + i, mask=i < n_sel, other=0, cache_modifier=".cg")
        j = blk * BS + c
        wi = tl.load(w_ptr + pid * CAND_P2 + i * BS_P2 + c, cache_modifier=".cg")
        used = (tl.full([BS_P2], i, tl.int32) < n_sel) & (wi > 0.0)
        vt = tl.load(v_row + j[:, None] * svl + d[None, :], mask=used[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(wi[:, None] * vt.to(tl.float32), axis=0)
    tl.store(out_ptr + b * sob + h * soh + d, (acc / total).to(out_ptr.dtype.element_ty), mask=dmask)


def block_topk_decode(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    positions: Tensor,
    *,
    topk: int,
    block_size: int,
    block_budget: int,
    scale: float,
    sink_tokens: int = 0,
    local_window: int = 0,
) -> Tensor:
    """Decode attention with block selection: q [B, H, Dh] -> [B, H, Dh].

    keys/values [B, Hkv, L, Dh] already hold the new key at positions[b] (the query's own
    position); kmin/kmax [B, Hkv, nb, Dh] summarise them (`update_block_summaries`).
    Query b sees keys j <= positions[b]; the semantics are TopKAttention's.
    """
    B, H, Dh = q.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not group over {Hkv} KV heads")
    _check_last_dim_contiguous(q=q, keys=keys, values=values, kmin=kmin, kmax=kmax)
    G, NB = H // Hkv, triton.cdiv(L, block_size)
    if decode_candidates(block_size, block_budget, L) > MAX_CANDIDATES:
        raise ValueError(
            f"block_budget {block_budget} x block_size {block_size} gives more than {MAX_CANDIDATES} "
            "candidate keys per query: too many for one decode program"
        )
    positions = positions.contiguous()
    bound = torch.empty(B, H, NB, dtype=torch.float32, device=q.device)
    tile = _p2(4096 // (_p2(G) * _p2(Dh)), 8)  # keeps G x TILE x Dh per program near 4k floats
    _block_bounds_kernel[(B * Hkv, triton.cdiv(NB, tile))](
        q,
        kmin,
        kmax,
        positions,
        bound,
        Hkv,
        NB,
        sink_tokens,
        local_window,
        q.stride(0),
        q.stride(1),
        kmin.stride(0),
        kmin.stride(1),
        kmin.stride(2),
        bound.stride(0),
        bound.stride(1),
        G=G,
        G_P2=_p2(G),
        BS=block_size,
        TILE=tile,
        DH=Dh,
        DH_P2=_p2(Dh),
    )
    budget = min(block_budget, NB)  # a larger budget keeps every eligible block all the same
    sel_p2 = _p2(budget + 1)
    bs_p2 = _p2(block_size)
    cand_p2 = _p2((budget + 1) * bs_p2)
    sel = torch.empty(B * H, sel_p2, dtype=torch.int32, device=q.device)
    scratch = torch.empty(B * H, cand_p2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, Dh, dtype=q.dtype, device=q.device)
    _block_decode_kernel[(B * H,)](
        q,
        keys,
        values,
        bound,
        positions,
        sel,
        scratch,
        out,
        H,
        NB,
        scale,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        bound.stride(0),
        bound.stride(1),
        out.stride(0),
        out.stride(1),
        G=G,
        TOPK=topk,
        BUDGET=budget,
        BS=block_size,
        SINK=sink_tokens,
        WINDOW=local_window,
        DH=Dh,
        DH_P2=_p2(Dh),
        BS_P2=bs_p2,
        NB_P2=_p2(NB),
        SEL_P2=sel_p2,
        CAND_P2=cand_p2,
        SINK_P2=_p2(sink_tokens),
        WIN_P2=_p2(local_window),
    )
    return out


# -- ragged embedding ----------------------------------------------------------------------
@triton.jit
def _ragged_embedding_kernel(
    ids_ptr,
    tier_ptr,
    row_ptr,
    table_ptr,
    proj_ptr,
    out_ptr,
    D,
    TIER,
    stab,
    sproj,
    sout,
    W: tl.constexpr,
    W_CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, block of D] = proj @ table[row_of[id]] when id's tier is TIER (else untouched)."""
    t, dblk = tl.program_id(0), tl.program_id(1)
    tok = tl.load(ids_ptr + t.to(tl.int64))
    if tl.load(tier_ptr + tok) == TIER:
        r = tl.load(row_ptr + tok)
        o = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for w0 in range(0, W, W_CHUNK):
            w = w0 + tl.arange(0, W_CHUNK)
            e = tl.load(table_ptr + r * stab + w, mask=w < W, other=0.0).to(tl.float32)
            pj = tl.load(
                proj_ptr + o[:, None] * sproj + w[None, :], mask=(o < D)[:, None] & (w < W)[None, :], other=0.0
            )
            acc += tl.sum(pj.to(tl.float32) * e[None, :], axis=1)
        tl.store(out_ptr + t * sout + o, acc.to(out_ptr.dtype.element_ty), mask=o < D)


def ragged_embedding(ids: Tensor, tier_of: Tensor, row_of: Tensor, tables: list[Tensor], projs: list[Tensor]) -> Tensor:
    """ids [..] int64 -> [.., D]: tier i's tokens are proj_i @ table_i[row_of[id]] (projs[i]: [D, d_i])."""
    vocab = tier_of.shape[0]
    flat = ids.reshape(-1).contiguous()
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            raise IndexError(f"token id {lo if lo < 0 else hi} is out of range for a vocabulary of {vocab}")
    D = projs[0].shape[0]
    out = torch.empty(flat.numel(), D, dtype=projs[0].dtype, device=ids.device)
    block_d = 32
    for i, (table, proj) in enumerate(zip(tables, projs, strict=True)):
        _check_last_dim_contiguous(table=table, proj=proj)
        width = table.shape[1]
        if flat.numel():
            _ragged_embedding_kernel[(flat.numel(), triton.cdiv(D, block_d))](
                flat,
                tier_of,
                row_of,
                table,
                proj,
                out,
                D,
                i,
                table.stride(0),
                proj.stride(0),
                out.stride(0),
                W=width,
                W_CHUNK=min(128, _p2(width, 16)),
                BLOCK_D=block_d,
            )
    return out.view(*ids.shape, D)


def _check_last_dim_contiguous(**tensors: Tensor) -> None:
    """The kernels index the last dimension with stride 1: say which tensor breaks that."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride {t.stride(-1)})")
