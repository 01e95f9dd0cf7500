"""`--weights int4|int8`: which matrices become block-quantized, from where, and the
PyTorch reference with the same dequantized weights.

- int4: the linear layers at 4 bits; the embedding table and the head at 8 bits (as
  llama.cpp's Q4 files keep them: the tied SmolLM2 table is Q8_0 in the GGUF).
- int8: every one of those matrices at 8 bits.

A matrix whose checkpoint holds the source file's blocks (`quantized.safetensors`, written by
`ragtop import` for a GGUF) that still dequantise exactly to its fp32 weight keeps them: Q4_1
as 4 bits (+ per-block minimum, exact) for int4, Q8_0 as 8 bits for both. Everything else is
rounded to nearest per block of 32 (`ragtop.quant.quantize_rtn`). Ragged embeddings (custom
op) stay in float; the linear layers and an untied head are still quantized.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..model import RaggedEmbedding, Transformer
from ..quant import BLOCK, FileBlocks, QBlocks, exact_file_blocks, quantize_rtn

WEIGHTS = ("fp32", "fp16", "int8", "int4")
LINEAR = re.compile(r"layers\.\d+\.(attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


@dataclass
class QuantizedWeight:
    blocks: QBlocks
    reference: torch.Tensor  # fp32 [N, K]: what the graph computes with
    source: str  # "gguf q4_1" | "gguf q8_0" | "rtn4" | "rtn8"


def plan(model: Transformer, weights: str, file_blocks: dict[str, FileBlocks]) -> dict[str, QuantizedWeight]:
    """State-dict name -> its quantized form ({} for fp32 / fp16)."""
    if weights not in ("int4", "int8"):
        return {}
    linear_bits = 4 if weights == "int4" else 8
    out: dict[str, QuantizedWeight] = {}
    for name, w in model.state_dict().items():
        if LINEAR.fullmatch(name):
            bits = linear_bits
        elif name == "lm_head.weight" or (name == "embed.weight" and not isinstance(model.embed, RaggedEmbedding)):
            bits = 8
        else:
            continue
        fb = file_blocks.get(name)
        if fb is not None and (fb.kind == "q8_0" or bits == 4) and exact_file_blocks(fb, w):
            out[name] = QuantizedWeight(fb.matmul_blocks(), w.detach().float().clone(), f"gguf {fb.kind}")
        else:
            q = quantize_rtn(w.detach().float().numpy(), bits)
            out[name] = QuantizedWeight(q, torch.from_numpy(q.dequantize(w.shape[1]).copy()), f"rtn{bits}")
    return out


def reference_model(model: Transformer, planned: dict[str, QuantizedWeight], accuracy_level: int = 0) -> Transformer:
    """`model` with every planned matrix replaced by what the quantized graph computes with.

    At accuracy level 4 the quantized matrices also round their input as MatMulNBits does
    there (`Int8ActivationLinear`), so validation compares the graph with exactly the
    arithmetic it claims; how much that rounding costs is measured against fp32 separately
    (perplexity, docs/export.md)."""
    if not planned:
        return model
    ref = copy.deepcopy(model)
    state = ref.state_dict()
    with torch.no_grad():
        for name, qw in planned.items():
            state[name].copy_(qw.reference)
    if accuracy_level == 4:
        for name, qw in planned.items():
            if name == "embed.weight":  # the table is read by a gather (exact); as the tied head it is a matmul
                if ref.lm_head is None:
                    ref.lm_head = Int8ActivationLinear(qw.blocks, model.config.d_model)
            else:
                parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
                parent = ref.get_submodule(parent_name) if parent_name else ref
                setattr(parent, attr, Int8ActivationLinear(qw.blocks, getattr(parent, attr).in_features))
    return ref.eval()


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded as MLAS rounds MatMulNBits' input at accuracy level 4 (its CompInt8 path):
    per block of 32 along the last axis, symmetric int8 with scale max|x|/127, round half to
    even of x * (1/scale); returned dequantized (codes * scale)."""
    K = x.shape[-1]
    pad = -K % BLOCK
    xb = nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, BLOCK)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(xb * inv) * scale).reshape(*x.shape[:-1], -1)[..., :K]


class Int8ActivationLinear(nn.Module):
    """x @ W^T as MatMulNBits computes it at accuracy level 4: the block-quantized part
    scales·(codes − zero point) against the int8-rounded input, plus the fp32 per-block
    minimum term (Q4_1's, on the unrounded input: a separate fp32 MatMul in the graph)."""

    def __init__(self, blocks: QBlocks, in_features: int) -> None:
        super().__init__()
        core = QBlocks(blocks.bits, blocks.codes, blocks.scales, blocks.zero_points, None)
        self.register_buffer("core", torch.from_numpy(core.dequantize(in_features).copy()))
        self.register_buffer("mins", None if blocks.mins is None else torch.from_numpy(blocks.mins.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_blocks(x) @ self.core.T
        if self.mins is not None:  # [N, nb]: sum_b mins[n, b] * sum_{k in block b} x[k]
            K = x.shape[-1]
            sums = nn.functional.pad(x, (0, -K % BLOCK)).reshape(*x.shape[:-1], -1, BLOCK).sum(-1)
            y = y + sums @ self.mins.T
        return y


def summary(planned: dict[str, QuantizedWeight]) -> dict[str, int]:
    """How many matrices came from where, e.g. {"gguf q4_1": 210, "gguf q8_0": 1}."""
    counts: dict[str, int] = {}
    for qw in planned.values():
        counts[qw.source] = counts.get(qw.source, 0) + 1
    return counts
