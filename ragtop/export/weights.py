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

from ..model import RaggedEmbedding, Transformer
from ..quant import FileBlocks, QBlocks, exact_file_blocks, quantize_rtn

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


def reference_model(model: Transformer, planned: dict[str, QuantizedWeight]) -> Transformer:
    """`model` with every planned matrix replaced by what the quantized graph computes with."""
    if not planned:
        return model
    ref = copy.deepcopy(model)
    state = ref.state_dict()
    with torch.no_grad():
        for name, qw in planned.items():
            state[name].copy_(qw.reference)
    return ref.eval()


def summary(planned: dict[str, QuantizedWeight]) -> dict[str, int]:
    """How many matrices came from where, e.g. {"gguf q4_1": 210, "gguf q8_0": 1}."""
    counts: dict[str, int] = {}
    for qw in planned.values():
        counts[qw.source] = counts.get(qw.source, 0) + 1
    return counts
