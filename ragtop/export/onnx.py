"""Checkpoint -> ONNX graph with a preallocated, shared KV cache.

Graph interface (one graph for prefill and decode; names follow Hugging Face / Optimum):

    inputs   input_ids                    [B, S]         int64
             past_lengths                 [B]            int64  tokens cached per sequence
             logits_indices               [B, K]         int64  positions (0..S-1) whose
                                                                logits are computed
             attention_dense              [B]            int64  top-k modes only: non-zero =
                                                                this sequence attends densely
                                                                (speculative verification);
                                                                optional, default [0] = all off
             past_key_values.{i}.key      [B, Hkv, C, Dh] float  C = cache capacity (float16
             past_key_values.{i}.value    [B, Hkv, C, Dh]        with --kv-dtype fp16)
             past_key_values.{i}.key_min  [B, Hkv, C/bs, Dh]  block selection only (activations' type)
             past_key_values.{i}.key_max  [B, Hkv, C/bs, Dh]  block selection only
    outputs  logits                       [B, K, V]
             present.{i}.key|value|key_min|key_max   same shapes as the past inputs

Token s of sequence b sits at position past_lengths[b] + s (so there is no position_ids
input) and is written into the cache there; bind present.* to the same buffers as
past_key_values.* (IO binding) and nothing is copied. `logits_indices` chooses the logits:
[[S-1]] (or each sequence's last real token) for serving, arange(S) for evaluation.

`--ops custom` emits ragtop::TopKAttention and ragtop::RaggedEmbedding nodes (and, with
int4/int8 weights at accuracy level 4 and `--matmul custom`, ragtop::MatMulBlocks) with a
standard-op FunctionProto each (functions.py); `--ops standard` inlines those functions, so
the file holds standard ops only. ragtop/model stays free of export code: the module below
reuses the model's submodules and only replaces the attention and embedding calls.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
import onnx.numpy_helper
import torch
from torch import Tensor, nn

from ..errors import RagtopError
from ..model import RaggedEmbedding, Transformer
from ..model.attention import TopKAttention, apply_rotary
from ..quant import BLOCK, QBlocks, concat_rows, nibble_split
from . import functions, ops

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which model.onnx keeps them outside
ROPE_OPSET = 23  # ONNX RotaryEmbedding / RMSNormalization (onnxruntime runs both natively)
FUSED_ATTN = ("q_proj", "k_proj", "v_proj")  # read the same input: stacked into one matrix
FUSED_MLP = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class ExportSpec:
    """What the exported graph looks like; written into genai_config.json."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_limit: int
    attention_mode: str  # dense | exact | block
    topk: int  # keys kept per query (context_limit for dense models)
    block_size: int  # 0 unless block selection
    block_budget: int  # 0 unless block selection
    num_tiers: int  # 0 for uniform embeddings
    ops: str  # custom | standard
    dtype: str  # fp32 | fp16
    opset: int
    weights: str = "fp32"  # fp32 | fp16 | int8 | int4 (weights.py)
    accuracy_level: int = 0  # MatMulNBits accuracy_level when weights are int4/int8
    sink_tokens: int = 0  # always-kept first tokens (top-k modes)
    local_window: int = 0  # always-kept last tokens up to each query (top-k modes)
    dense_layers: int = 0  # the first N layers' nodes attend densely (top-k modes)
    kv_dtype: str = "fp32"  # fp32 | fp16: the key/value cache (summaries keep the activations' type)
    layer_budgets: tuple[int, ...] = ()  # block mode: one budget per layer (block_budget: their maximum)
    matmul: str = "custom"  # block-quantized matrices: custom (ragtop::MatMulBlocks) | standard (MatMulNBits)

    @property
    def cache_torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.kv_dtype == "fp16" else torch.float32

    @property
    def cache_names(self) -> list[str]:
        return ["key", "value"] + (["key_min", "key_max"] if self.attention_mode == "block" else [])

    def input_names(self) -> list[str]:
        past = [f"past_key_values.{i}.{n}" for i in range(self.n_layers) for n in self.cache_names]
        return ["input_ids", "past_lengths", "logits_indices", *past]

    def output_names(self) -> list[str]:
        return ["logits", *(f"present.{i}.{n}" for i in range(self.n_layers) for n in self.cache_names)]


def make_spec(
    model: Transformer,
    context_limit: int,
    ops_mode: str,
    dtype: str,
    opset: int,
    weights: str | None = None,
    accuracy_level: int = 0,
    kv_dtype: str | None = None,
    matmul: str = "custom",
) -> ExportSpec:
    """kv_dtype: the key/value cache's type, default the activations' (fp16 under fp32
    activations halves the cache; fp32 under fp16 activations is refused)."""
    cfg = model.config
    a = cfg.attention
    mode = functions.attention_mode(a.topk if a.kind == "topk" else None, a.block_size, context_limit)
    return ExportSpec(
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        context_limit=context_limit,
        attention_mode=mode,
        topk=context_limit if mode == "dense" else int(a.topk),
        block_size=int(a.block_size or 0) if mode == "block" else 0,
        block_budget=int(a.block_budget or 0) if mode == "block" else 0,
        num_tiers=model.embed.n_tiers if isinstance(model.embed, RaggedEmbedding) else 0,
        ops=ops_mode,
        dtype=dtype,
        opset=opset,
        weights=weights or dtype,
        accuracy_level=accuracy_level if weights in ("int4", "int8") else 0,
        kv_dtype=kv_dtype or dtype,
        matmul=matmul if weights in ("int4", "int8") and accuracy_level == 4 else "standard",  # see linear()
        **(
            {}
            if mode == "dense"
            else {
                "sink_tokens": a.sink_tokens,
                "local_window": a.local_window,
                "dense_layers": min(a.dense_layers, cfg.n_layers),
                **({"layer_budgets": a.layer_budgets} if mode == "block" else {}),
            }
        ),
    )


class ExportGraph(nn.Module):
    """The exported computation: the model's own modules, with attention and the ragged
    embedding lowered to ragtop custom ops while exporting (never run eagerly)."""

    def __init__(self, model: Transformer, spec: ExportSpec, quantized: dict[str, QBlocks] | None = None) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.per_layer = len(spec.cache_names)
        # block-quantized matrices: buffers (-> initializers) named after the weight. At accuracy
        # level 0/1 an 8-bit matrix runs as its two 4-bit nibble halves (quant.nibble_split).
        self.quantized: dict[str, tuple[str, list[tuple[str, QBlocks]]]] = {}
        for name, qb in self._fuse(model, spec, quantized or {}).items():
            key = name.removesuffix(".weight").replace(".", "_")
            split = qb.bits == 8 and spec.accuracy_level in (0, 1)
            parts = list(zip(("_hi", "_lo"), nibble_split(qb), strict=True)) if split else [("", qb)]
            for suffix, part in parts:
                self.register_buffer(f"{key}{suffix}_q", torch.from_numpy(part.packed_codes()))
                self.register_buffer(f"{key}{suffix}_scales", torch.from_numpy(part.scales.copy()))
                if part.zero_points is not None:
                    self.register_buffer(f"{key}{suffix}_zp", torch.from_numpy(part.packed_zero_points()))
                if part.mins is not None:  # [nb, N]: per-block sums of x times these
                    self.register_buffer(f"{key}{suffix}_mins", torch.from_numpy(part.mins.T.copy()))
            self.quantized[name] = (key, parts)
        self.rope = rope_tables(model, spec) if spec.opset >= ROPE_OPSET else None
        if self.rope is not None:
            self.register_buffer("rope_cos", self.rope[0])
            self.register_buffer("rope_sin", self.rope[1])

    def _fuse(self, model: Transformer, spec: ExportSpec, quantized: dict[str, QBlocks]) -> dict[str, QBlocks]:
        """Stack the matrices that read the same input (q/k/v, gate/up) into one: one
        MatMul(NBits) node instead of three or two. `self.fused[prefix.q_proj+k_proj+v_proj]`
        holds the stacked matrix's name and the output sizes to split."""
        self.fused: dict[str, tuple[str, list[int]]] = {}
        quantized = dict(quantized)
        for i, layer in enumerate(model.layers):
            for sub, module, names, stacked in (
                ("attn", layer.attn, FUSED_ATTN, "qkv_proj"),
                ("mlp", layer.mlp, FUSED_MLP, "gate_up_proj"),
            ):
                prefix = f"layers.{i}.{sub}"
                full = [f"{prefix}.{n}.weight" for n in names]
                mods = [getattr(module, n, None) for n in names]
                if any(not isinstance(m, nn.Linear) or m.bias is not None for m in mods):
                    continue
                sizes = [m.out_features for m in mods]
                if all(n in quantized for n in full):
                    qb = concat_rows([quantized[n] for n in full])
                    if qb is None:
                        continue
                    for n in full:
                        del quantized[n]
                    quantized[f"{prefix}.{stacked}.weight"] = qb
                elif not any(n in quantized for n in full):
                    w = torch.cat([m.weight.detach() for m in mods])
                    self.register_buffer(f"{prefix}.{stacked}".replace(".", "_") + "_weight", w)
                else:
                    continue
                self.fused[f"{prefix}.{'+'.join(names)}"] = (f"{prefix}.{stacked}", sizes)
        return quantized

    def forward(self, input_ids: Tensor, past_lengths: Tensor, logits_indices: Tensor, cache: list[Tensor]):
        m = self.model
        B, S = input_ids.shape
        positions = past_lengths[:, None] + torch.arange(S, device=input_ids.device)  # [B,S]
        x = self.embed(input_ids)  # [B,S,D]
        if self.rope is None:  # decomposed rotate-half, from cos/sin of these positions
            cos, sin = m.rotary(positions)
            rope: tuple = (cos.to(x.dtype), sin.to(x.dtype))
        else:  # one RotaryEmbedding node per projection, reading the tables at these positions
            rope = (positions,)
        presents: list[Tensor] = []
        for i, layer in enumerate(m.layers):
            past = cache[i * self.per_layer : (i + 1) * self.per_layer]
            out, present = self.attention(layer.attn, layer.attn_norm(x), rope, past_lengths, past, f"layers.{i}.attn")
            x = x + out
            x = x + self.mlp(layer.mlp, layer.mlp_norm(x), f"layers.{i}.mlp")
            presents += present
        # logits only where asked: [B,S,D] -> [B,K,D]
        K = logits_indices.shape[1]
        x = x.gather(1, logits_indices[:, :, None].expand(B, K, x.shape[-1]))
        h = m.norm(x)
        if "lm_head.weight" in self.quantized:
            return self.linear("lm_head", m.lm_head, h), *presents
        if m.lm_head is None and "embed.weight" in self.quantized:  # tied head
            return self.linear("embed", m.embed, h), *presents
        return m.logits(h), *presents

    def linear(self, prefix: str, module: nn.Module, x: Tensor) -> Tensor:
        """x @ W^T: when W is quantized, a com.microsoft::MatMulNBits node (+ the per-block
        minimum term), or with `--matmul custom` one ragtop::MatMulBlocks node per part
        (ops.py: the same inputs, the minima fused; its function body is that subgraph);
        else the module itself."""
        entry = self.quantized.get(f"{prefix}.weight")
        if entry is None:
            return module(x)
        key, parts = entry
        K = x.shape[-1]
        y = None
        attrs = {"K": K, "bits": 0, "block_size": BLOCK, "accuracy_level": self.spec.accuracy_level}
        for suffix, qb in parts:
            N, Kp = qb.shape
            attrs.update(N=N, bits=qb.bits)
            inputs = [x, getattr(self, f"{key}{suffix}_q"), getattr(self, f"{key}{suffix}_scales")]
            zp = getattr(self, f"{key}{suffix}_zp") if qb.zero_points is not None else None
            # where the kernel measured faster (docs/kernels.md): 4-bit matrices at accuracy level 4;
            # 8-bit ones and level 0 (MLAS's fp32 path dequantises once and runs an SGEMM) stay MatMulNBits
            if self.spec.matmul == "custom" and qb.bits == 4 and self.spec.accuracy_level == 4:
                mins = getattr(self, f"{key}{suffix}_mins") if qb.mins is not None else None
                part = torch.onnx.ops.symbolic(
                    f"{ops.DOMAIN}::{ops.MATMUL_BLOCKS}",
                    [*inputs, zp, mins] if mins is not None else [*inputs, zp],
                    attrs,
                    dtype=x.dtype,
                    shape=[*x.shape[:-1], N],
                    version=ops.OPSET_VERSION,
                )
                y = part if y is None else y + part
                continue
            part = torch.onnx.ops.symbolic(
                "com.microsoft::MatMulNBits",
                inputs if zp is None else [*inputs, zp],
                attrs,
                dtype=x.dtype,
                shape=[*x.shape[:-1], N],
                version=1,
            )
            y = part if y is None else y + part
            if qb.mins is not None:  # sum_b mins[b, n] * sum_{k in block b} x[k]
                xp = x if Kp == K else nn.functional.pad(x, (0, Kp - K))
                sums = xp.reshape(*x.shape[:-1], Kp // BLOCK, BLOCK).sum(-1)
                y = y + sums @ getattr(self, f"{key}{suffix}_mins")
        return y

    def project(self, prefix: str, module: nn.Module, names: tuple[str, ...], x: Tensor) -> list[Tensor]:
        """x @ W^T for matrices that read the same x: one node when they were stacked (_fuse)."""
        fused = self.fused.get(f"{prefix}.{'+'.join(names)}")
        if fused is None:
            return [self.linear(f"{prefix}.{n}", getattr(module, n), x) for n in names]
        name, sizes = fused
        if f"{name}.weight" in self.quantized:
            y = self.linear(name, None, x)
        else:
            y = nn.functional.linear(x, getattr(self, name.replace(".", "_") + "_weight"))
        return list(y.split(sizes, dim=-1))

    def mlp(self, mlp: nn.Module, x: Tensor, prefix: str) -> Tensor:
        gate, up = self.project(prefix, mlp, FUSED_MLP, x)
        return self.linear(f"{prefix}.down_proj", mlp.down_proj, nn.functional.silu(gate) * up)

    def embed(self, ids: Tensor) -> Tensor:
        e = self.model.embed
        if "embed.weight" in self.quantized:  # 8-bit symmetric blocks: (code - 128) * scale
            key, parts = self.quantized["embed.weight"]
            B, S = ids.shape
            # the head's own initializers: [V,nb,32] codes, or [V,nb,16] nibble pairs per half
            if len(parts) == 1:
                codes = getattr(self, f"{key}_q")[ids].to(torch.float32)  # [B,S,nb,32]
                scales = getattr(self, f"{key}_scales")[ids]  # [B,S,nb]
            else:
                hi, lo = (unpack_nibbles(getattr(self, f"{key}_{h}_q")[ids]) for h in ("hi", "lo"))
                codes = 16 * hi + lo
                scales = getattr(self, f"{key}_lo_scales")[ids]
            x = (codes - 128.0) * scales[..., None]
            return x.reshape(B, S, -1)[..., : self.model.config.d_model]
        if not isinstance(e, RaggedEmbedding):
            return nn.functional.embedding(ids, e.weight)
        inputs = [ids, e.tier_of, e.row_of]
        for table, proj in zip(e.tables, e.projs, strict=True):
            inputs += [table, proj.weight]
        B, S = ids.shape
        return torch.onnx.ops.symbolic(
            f"{ops.DOMAIN}::{ops.RAGGED_EMBEDDING}",
            inputs,
            {"num_tiers": e.n_tiers},
            dtype=e.tables[0].dtype,
            shape=[B, S, self.model.config.d_model],
            version=ops.OPSET_VERSION,
        )

    def rotary(self, x: Tensor, rope: tuple, heads: int) -> Tensor:
        """Rotary position embedding of x [B,S,heads*Dh] (rotate-half convention)."""
        B, S, _ = x.shape
        if self.rope is None:  # on [B,heads,S,Dh], then back to [B,S,heads*Dh]
            cos, sin = rope
            x = x.view(B, S, heads, -1).transpose(1, 2)
            return apply_rotary(x, cos, sin).transpose(1, 2).reshape(B, S, -1)
        (positions,) = rope
        return torch.onnx.ops.rotary_embedding(
            x, self.rope_cos, self.rope_sin, positions, interleaved=False, num_heads=heads
        )

    def attention(self, attn, h: Tensor, rope: tuple, past_lengths: Tensor, past: list[Tensor], prefix: str):
        spec = self.spec
        H, Hkv = attn.n_heads, attn.n_kv_heads
        q, k, v = self.project(prefix, attn, FUSED_ATTN, h)  # [B,S,heads*Dh] each
        q, k = self.rotary(q, rope, H), self.rotary(k, rope, Hkv)
        attrs = {
            "num_heads": H,
            "num_kv_heads": Hkv,
            "topk": spec.topk,
            "scale": float(attn.scale),
            "block_size": spec.block_size,
            # per layer when the model has layer budgets (spec.block_budget is their maximum)
            "block_budget": attn.block_budget
            if isinstance(attn, TopKAttention) and spec.block_size
            else spec.block_budget,
        }
        if spec.attention_mode != "dense":
            attrs.update(sink_tokens=spec.sink_tokens, local_window=spec.local_window)
            if not isinstance(attn, TopKAttention):  # one of the dense first layers: same op, keeps every key
                attrs.update(
                    topk=spec.context_limit,
                    block_budget=-(-spec.context_limit // spec.block_size) if spec.block_size else 0,
                )
        outs = torch.onnx.ops.symbolic_multi_out(
            f"{ops.DOMAIN}::{ops.TOPK_ATTENTION}",
            [q, k, v, past[0], past[1], past_lengths, *past[2:]],
            attrs,
            dtypes=[q.dtype, *(p.dtype for p in past)],
            shapes=[q.shape, *(p.shape for p in past)],
            version=ops.OPSET_VERSION,
        )
        return self.linear(f"{prefix}.o_proj", attn.o_proj, outs[0]), list(outs[1:])


def rope_tables(model: Transformer, spec: ExportSpec) -> tuple[Tensor, Tensor]:
    """cos/sin [rows, Dh/2] for every position a cache of the context limit can hold (rounded
    up to whole blocks, as the runner rounds its capacity), computed exactly as the model's
    RotaryEmbedding computes them (fp32 position * inv_freq)."""
    rows = -(-spec.context_limit // max(spec.block_size, 1)) * max(spec.block_size, 1)
    freqs = torch.arange(rows, dtype=torch.float32)[:, None] * model.rotary.inv_freq.float()
    dtype = torch.float16 if spec.dtype == "fp16" else torch.float32
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [..., 16] of two 4-bit codes each (low nibble first) -> float [..., 32] codes."""
    f = packed.to(torch.float32)
    high = torch.floor(f / 16)
    return torch.stack((f - 16 * high, high), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def example_inputs(spec: ExportSpec, dtype: torch.dtype) -> tuple:
    """Example inputs with every dynamic size distinct and >= 2 (a size-1 example would
    fix that axis in the graph)."""
    B, S = 2, 5  # and K = 3 logits per sequence
    C = 8 * spec.block_size if spec.block_size else 17
    cache = []
    kv = torch.float16 if spec.kv_dtype == "fp16" else dtype  # the summaries keep `dtype`
    for _ in range(spec.n_layers):
        cache += [torch.zeros(B, spec.n_kv_heads, C, spec.head_dim, dtype=kv) for _ in range(2)]
        if spec.block_size:
            cache += [
                torch.zeros(B, spec.n_kv_heads, C // spec.block_size, spec.head_dim, dtype=dtype) for _ in range(2)
            ]
    ids = torch.zeros(B, S, dtype=torch.long)
    return ids, torch.tensor([0, 3]), torch.tensor([[4, 3, 0], [1, 2, 4]]), cache


def dynamic_shapes(spec: ExportSpec) -> tuple:
    Dim = torch.export.Dim
    batch, seq, keep = Dim("batch"), Dim("sequence"), Dim("num_logits")
    cap = Dim("capacity")
    cache = []
    for _ in range(spec.n_layers):
        cache += [{0: batch, 2: cap}, {0: batch, 2: cap}]
        if spec.block_size:
            blocks = Dim("cache_blocks")
            cache += [{0: batch, 2: blocks}, {0: batch, 2: blocks}]
    return {0: batch, 1: seq}, {0: batch}, {0: batch, 1: keep}, cache


def export_graph(
    model: Transformer, spec: ExportSpec, verbose: bool = False, quantized: dict[str, QBlocks] | None = None
) -> onnx.ModelProto:
    """Trace the model with torch.onnx (dynamo) and return the finished ModelProto.
    `quantized` (weights.py): matrices emitted as com.microsoft::MatMulNBits blocks."""
    dtype = torch.float16 if spec.dtype == "fp16" else torch.float32
    if dtype != torch.float32:  # keep the caller's fp32 model for validation
        model = copy.deepcopy(model).to(dtype)
    graph = ExportGraph(model.eval(), spec, quantized)
    args = example_inputs(spec, dtype)
    # the exporter is chatty (and warns about things that do not concern this graph)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                graph,
                args,
                dynamo=True,
                opset_version=spec.opset,
                input_names=spec.input_names(),
                output_names=spec.output_names(),
                dynamic_shapes=dynamic_shapes(spec),
                verbose=False,
                report=False,
                optimize=True,
            )
        except Exception as e:  # exporter errors are long; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RagtopError(f"torch.onnx.export failed: {first}") from e
    proto = program.model_proto
    return finish_model(proto, spec)


def finish_model(proto: onnx.ModelProto, spec: ExportSpec) -> onnx.ModelProto:
    """Attach the function bodies (custom) or inline them away (standard); add metadata."""
    del proto.functions[:]  # the exporter adds none for our ops; start clean either way
    used = {(n.domain, n.op_type) for n in proto.graph.node}
    dense_flag = spec.attention_mode != "dense" and (ops.DOMAIN, ops.TOPK_ATTENTION) in used
    if dense_flag:
        add_dense_flag(proto, spec)
    if (ops.DOMAIN, ops.TOPK_ATTENTION) in used:
        kv_cast = spec.kv_dtype != spec.dtype  # a float16 cache under float activations
        proto.functions.append(functions.topk_attention_function(spec.attention_mode, spec.opset, dense_flag, kv_cast))
    if (ops.DOMAIN, ops.RAGGED_EMBEDDING) in used:
        proto.functions.append(functions.ragged_embedding_function(spec.num_tiers, spec.opset))
    if (ops.DOMAIN, ops.MATMUL_BLOCKS) in used:
        add_matmul_blocks_functions(proto, spec.opset)
    if not any(o.domain == ops.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION))
    if spec.ops == "standard":
        proto = onnx.inliner.inline_local_functions(proto)
        keep = [o for o in proto.opset_import if o.domain != ops.DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
    proto.producer_name, proto.producer_version = "ragtop", "0.1.0"
    meta = {
        "ragtop.attention_mode": spec.attention_mode,
        "ragtop.ops": spec.ops,
        "ragtop.context_limit": str(spec.context_limit),
        "ragtop.weights": spec.weights,
        "ragtop.kv_dtype": spec.kv_dtype,
    }
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    return proto


def add_matmul_blocks_functions(proto: onnx.ModelProto, opset: int) -> None:
    """Give each ragtop::MatMulBlocks node its function body: a node with `mins` (input 4)
    the overload ops.MATMUL_BLOCKS_MINS, the others the default; the bodies pad x to whole
    blocks only when some node's K needs it."""
    nodes = [n for n in proto.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.MATMUL_BLOCKS]
    with_mins = [n for n in nodes if len(n.input) > 4 and n.input[4]]
    for n in with_mins:
        n.overload = ops.MATMUL_BLOCKS_MINS
    if len(with_mins) < len(nodes):
        proto.functions.append(functions.matmul_blocks_function(opset, mins=False))
    if with_mins:
        padded = any(next(a.i for a in n.attribute if a.name == "K") % BLOCK for n in with_mins)
        proto.functions.append(functions.matmul_blocks_function(opset, mins=True, padded=padded))
    if not any(o.domain == ops.MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(ops.MS_DOMAIN, 1))
    proto.ir_version = max(proto.ir_version, 10)  # function overloads


def add_dense_flag(proto: onnx.ModelProto, spec: ExportSpec) -> None:
    """Give a top-k graph the input `attention_dense` [batch] int64 and feed it to every
    TopKAttention node (its optional input 8, ops.py): a flagged sequence attends densely.
    Self-speculative decoding drafts with the sparse graph and verifies with the same graph
    flagged, so the weights are loaded once. Done on the finished graph rather than traced:
    the torch module stays the model's own code."""
    # [batch] when fed; its default (an initializer of the same name) is [0]: one flag, off,
    # for every sequence, so callers that never speculate need not feed it
    flag = onnx.helper.make_tensor_value_info(ops.ATTENTION_DENSE, onnx.TensorProto.INT64, ["dense_flags"])
    proto.graph.input.append(flag)  # last: inputs keep their positions of older files
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.int64), ops.ATTENTION_DENSE))
    if spec.attention_mode == "exact":  # the summaries' places hold empty tensors (ops.py)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            onnx.TensorProto.FLOAT16 if spec.dtype == "fp16" else onnx.TensorProto.FLOAT
        )
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(0, dtype), ops.NO_BLOCK_SUMMARY))
    for node in proto.graph.node:
        if node.domain == ops.DOMAIN and node.op_type == ops.TOPK_ATTENTION:
            if len(node.input) == 6:
                node.input.extend([ops.NO_BLOCK_SUMMARY] * 2)
            node.input.append(ops.ATTENTION_DENSE)


def weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(
        math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in proto.graph.initializer
    )


def save_model(proto: onnx.ModelProto, path, force_external: bool = False) -> None:
    """model.onnx, with weights in model.onnx.data when they exceed EXTERNAL_DATA_THRESHOLD."""
    external = force_external or weight_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


PAGED_SUFFIX = ".paged.onnx"


def page_size_for(attention_mode: str, block_size: int) -> int:
    """The page of a paged cache: the selection block (one summary per page) or 16 tokens."""
    return block_size if attention_mode == "block" and block_size else 16


def page_graph(proto: onnx.ModelProto, attention_mode: str) -> onnx.ModelProto:
    """The same graph over a paged KV cache (ops.py TopKAttention input 9): a graph input
    `block_table` [batch, max_pages] int64 fed to every TopKAttention node, the cache inputs
    and outputs read as page pools [num_pages, Hkv, page_size, Dh], and the paged function
    body. Weights are untouched, so a file loaded without its external data and saved next to
    it shares model.onnx.data. Only custom-op files (`--ops custom`) can be paged."""
    nodes = [n for n in proto.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.TOPK_ATTENTION]
    if not nodes:
        raise RagtopError("only a graph with ragtop::TopKAttention nodes (--ops custom) can use a paged KV cache")
    if any(ops.BLOCK_TABLE == i.name for i in proto.graph.input):
        return proto
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    names = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    if ops.ATTENTION_DENSE not in names:  # a dense file: the flag's place holds a constant [0]
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.int64), ops.ATTENTION_DENSE))
    if ops.NO_BLOCK_SUMMARY not in names and attention_mode != "block":
        elem = next(i for i in proto.graph.input if i.name.startswith("past_key_values.")).type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(0, dtype), ops.NO_BLOCK_SUMMARY))
    # the tracer may read the batch size off a cache input (Shape(past..., 0, 1)): with pools the
    # first dimension is the page count, so read it off input_ids instead
    cache_inputs = {i.name for i in proto.graph.input if i.name.startswith("past_key_values.")}
    for node in proto.graph.node:
        if node.op_type == "Shape" and node.input and node.input[0] in cache_inputs:
            span = {a.name: a.i for a in node.attribute}
            if span.get("start", 0) != 0 or span.get("end") != 1:
                raise RagtopError(f"{node.name} reads the cache's shape {span}: cannot page this graph")
            node.input[0] = "input_ids"
        elif node.op_type != "TopKAttention" and any(x in cache_inputs for x in node.input):
            raise RagtopError(f"{node.name} ({node.op_type}) reads a cache input: cannot page this graph")
    for node in nodes:
        if len(node.input) == 6:
            node.input.extend([ops.NO_BLOCK_SUMMARY] * 2)
        if len(node.input) == 8:
            node.input.append(ops.ATTENTION_DENSE)
        node.input.append(ops.BLOCK_TABLE)
    proto.graph.input.append(
        onnx.helper.make_tensor_value_info(ops.BLOCK_TABLE, onnx.TensorProto.INT64, ["batch", "max_pages"])
    )
    for v in [*proto.graph.input, *proto.graph.output]:
        if v.name.startswith(("past_key_values.", "present.")):
            dims = v.type.tensor_type.shape.dim
            dims[0].dim_param = "num_pages"
            dims[2].dim_param = "page_blocks" if v.name.endswith(("key_min", "key_max")) else "page_size"
    old = [f for f in proto.functions if f.domain == ops.DOMAIN and f.name == ops.TOPK_ATTENTION]
    # a float16 cache under float activations: the old body casts the new rows to the cache's type
    kv_cast = any(n.op_type == "CastLike" and "past_key" in n.input for f in old for n in f.node)
    keep = [f for f in proto.functions if f not in old]
    del proto.functions[:]
    proto.functions.extend([*keep, functions.paged_topk_attention_function(attention_mode, opset, kv_cast)])
    proto.metadata_props.add(key="ragtop.kv_cache", value="paged")
    return proto


def write_paged_graph(folder, page_size: int | None = None) -> str:
    """Write `<model>.paged.onnx` next to an exported folder's graph (sharing its external
    weights) and record it in genai_config.json (ragtop.kv_cache.paged). Returns its name."""
    import json
    from pathlib import Path

    folder = Path(folder)
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    dec, att = cfg["model"]["decoder"], cfg["ragtop"]["attention"]
    mode, bs = att["mode"], int(att.get("block_size") or 0)
    page = page_size or page_size_for(mode, bs)
    if mode == "block" and page % bs:
        raise RagtopError(f"page size {page} must be a multiple of the selection block size {bs}")
    src = dec["filename"]
    proto = onnx.load(str(folder / src), load_external_data=False)
    proto = page_graph(proto, mode)
    name = src.removesuffix(".onnx") + PAGED_SUFFIX
    onnx.save(proto, str(folder / name))
    cfg["ragtop"]["kv_cache"]["paged"] = {
        "filename": name,
        "page_size": page,
        "layout": "[num_pages, num_key_value_heads, page_size, head_size]",
        "summary_layout": "[num_pages, num_key_value_heads, page_size / block_size, head_size]" if bs else None,
        "block_table": "[batch, max_pages] int64: row j of sequence b is in page block_table[b, j // page_size]",
    }
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return name
