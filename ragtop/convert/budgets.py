"""Per-layer block budgets: spend block selection's reads where attention needs them.

Layers differ a lot in how concentrated their attention is: on SmolLM2 at 8k tokens some
layers lose nothing with 4 blocks of 64 keys, others still lose with 40 (docs/models.md,
"Block budgets per layer"). One budget for every layer spends most of the reads where they
change nothing. `ragtop allocate-budgets` measures, on training text and dense attention,
what each layer's attention output loses at every budget, then hands out a fixed total of
blocks greedily where they reduce that loss most. Same total = same KV bytes read per
token; the held-out perplexity (`ragtop sweep --runner onnx`) says whether it paid.

The loss of layer l at budget b: for sampled queries of the window's later half, the dense
attention output o (per head) against the block-selection output o_b (sinks, local window,
the query's own block and the b eligible blocks with the largest Quest bound, softmax
renormalised over them), projected by the layer's output matrix and divided by the squared
norm of the residual stream entering the layer: E ||W_o (o_b - o)||^2 / ||x||^2, the
relative change the selection makes to what the layer adds to the residual stream. (The
attention mass the selection misses, `--objective mass`, is a worse guide: layers whose
attention is spread thin miss much of it while their output barely moves; allocating by it
did not beat one budget for every layer.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..model import AttentionConfig, Transformer
from ..model.attention import Attention, block_bounds
from .sweep import Passage


@dataclass(frozen=True)
class SelectionShape:
    """The block selection whose per-layer budgets are allocated (everything but the budget)."""

    block_size: int
    sink_tokens: int
    local_window: int
    max_budget: int = 128


def attention_inputs(model: Transformer, ids: Tensor, queries: Tensor) -> list[dict]:
    """Per layer of a dense forward over `ids` ([1, n]): q at `queries`, all keys and values
    (rotary applied, grouped heads expanded), the output matrix and the squared norm of the
    residual stream entering the layer at `queries`."""
    captured: list[dict] = [{} for _ in model.layers]
    hooks = []
    for i, layer in enumerate(model.layers):

        def block_hook(mod, args, i=i):
            x = args[0][0]  # [n, D]
            captured[i]["resid"] = (x[queries] ** 2).sum(-1)

        def attn_hook(attn: Attention, args, i=i):
            q, k, v = attn.project(args[0], args[1])
            captured[i].update(
                q=q[0][:, queries],
                k=attn.expand_kv(k)[0],
                v=attn.expand_kv(v)[0],
                scale=attn.scale,
                wo=attn.o_proj.weight,
            )

        hooks.append(layer.register_forward_pre_hook(block_hook))
        hooks.append(layer.attn.register_forward_pre_hook(attn_hook))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


OBJECTIVES = ("output", "mass")


def selection_errors(c: dict, queries: Tensor, shape: SelectionShape, objective: str = "output") -> np.ndarray:
    """[max_budget + 1]: the relative output change of one layer at each block budget
    (objective "mass": the share of dense attention probability the selection drops)."""
    q, k, v, wo = c["q"], c["k"], c["v"], c["wo"]
    H, Q, _ = q.shape
    L, bs = k.shape[1], shape.block_size
    nb = -(-L // bs)
    pad = nb * bs - L
    j = torch.arange(L)
    scores = (q * c["scale"]) @ k.transpose(-1, -2)  # [H,Q,L]
    probs = torch.softmax(scores.masked_fill(j[None, :] > queries[:, None], float("-inf")), -1)
    dense_out = probs @ v  # [H,Q,Dh]
    forced = (j[None, :] < shape.sink_tokens) | (j[None, :] > queries[:, None] - shape.local_window)  # [Q,L]
    forced_mass, forced_out = (probs * forced).sum(-1), (probs * forced) @ v
    free = nn_pad(probs * ~forced, pad).view(H, Q, nb, bs)  # free probability per block slot
    block_mass = free.sum(-1)  # [H,Q,nb]
    block_out = torch.einsum(
        "hqnb,hnbd->hqnd", free, nn_pad(v.transpose(1, 2), pad).view(H, -1, nb, bs).permute(0, 2, 3, 1)
    )
    kb = nn_pad(k.transpose(1, 2), pad).view(H, -1, nb, bs)  # [H,Dh,nb,bs]: padding rows are zeros
    kmin, kmax = kb.amin(-1).transpose(1, 2), kb.amax(-1).transpose(1, 2)  # [H,nb,Dh]
    # the ranking TopKAttention.block_selection uses: bound [H,Q,nb] (-inf where not eligible)
    bound, own, eligible = block_bounds(q, queries[:, None], kmin, kmax, bs, shape.sink_tokens, shape.local_window)
    base_mass = forced_mass + (block_mass * own).sum(-1)
    base_out = forced_out + (block_out * own[None, :, :, None]).sum(2)
    order = torch.argsort(bound, dim=-1, descending=True, stable=True)
    mass = torch.gather(block_mass * eligible, -1, order).cumsum(-1)
    out = torch.gather(block_out * eligible[None, :, :, None], 2, order[..., None].expand_as(block_out)).cumsum(2)
    errors = np.zeros(shape.max_budget + 1)
    for b in range(shape.max_budget + 1):
        m, o = base_mass, base_out
        if b:
            m, o = m + mass[..., min(b, nb) - 1], o + out[:, :, min(b, nb) - 1]
        if objective == "mass":
            errors[b] = float((1 - m).mean())
            continue
        delta = (o / m[..., None] - dense_out).transpose(0, 1).reshape(Q, -1) @ wo.T  # [Q, D]
        errors[b] = float(((delta**2).sum(-1) / c["resid"]).mean())
    return errors


def nn_pad(t: Tensor, pad: int) -> Tensor:
    """`t` padded with `pad` zeros on its last axis."""
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


@torch.no_grad()
def layer_errors(
    model: Transformer,
    passages: Sequence[Passage],
    shape: SelectionShape,
    query_stride: int = 32,
    objective: str = "output",
) -> np.ndarray:
    """[n_layers, max_budget + 1]: each layer's selection error at each budget, averaged over
    the passages' queries from the middle of each window on (every `query_stride`-th)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    total = np.zeros((model.config.n_layers, shape.max_budget + 1))
    for p in passages:
        ids = p.ids[None, :-1]
        n = ids.shape[1]
        queries = torch.arange(n // 2, n, query_stride)
        for i, c in enumerate(attention_inputs(model, ids, queries)):
            total[i] += selection_errors(c, queries, shape, objective)
    return total / len(passages)


def allocate(errors: np.ndarray, mean_budget: float, floor: int = 1, dense_layers: int = 0) -> list[int]:
    """Block budgets per layer summing to round(mean_budget * sparse layers): every layer
    starts at `floor`, then blocks go one small run at a time (1-8 blocks) to the layer whose
    error falls fastest per block (errors [n_layers, max_budget + 1], non-increasing along a
    row in practice). Dense layers keep `floor` (their budget is not used)."""
    n_layers, top = errors.shape[0], errors.shape[1] - 1
    sparse = list(range(dense_layers, n_layers))
    budgets = [floor] * n_layers
    left = round(mean_budget * len(sparse)) - floor * len(sparse)
    if left < 0 or floor < 1:
        raise ValueError(f"mean budget {mean_budget} is below the floor {floor} (floor >= 1)")
    while left > 0:
        best, pick, run = -math.inf, None, 1
        for i in sparse:
            for s in range(1, min(8, left, top - budgets[i]) + 1):
                gain = (errors[i, budgets[i]] - errors[i, budgets[i] + s]) / s
                if gain > best:
                    best, pick, run = gain, i, s
        if pick is None:  # every layer at the largest budget measured
            break
        budgets[pick] += run
        left -= run
    return budgets


def predicted_error(errors: np.ndarray, budgets: Sequence[int], dense_layers: int = 0) -> float:
    """The summed selection error of `budgets` (dense layers: none)."""
    return float(sum(errors[i, b] for i, b in enumerate(budgets) if i >= dense_layers))


def attention_with_budgets(shape: SelectionShape, budgets: Sequence[int], dense_layers: int = 0) -> AttentionConfig:
    """The block-selection config (every key of the chosen blocks) with these layer budgets."""
    top = max(budgets)
    return AttentionConfig(
        "topk",
        (top + 1) * shape.block_size,
        shape.block_size,
        top,
        shape.sink_tokens,
        shape.local_window,
        dense_layers,
        tuple(budgets),
    )
