"""Single-node ONNX graphs for the plugin kernels and the attention baselines.

Used by `ragtop bench ops` and tests/plugins: a graph holding just one ragtop custom node
(domain `ragtop`, version 1), a standard-op exact top-k attention over a shared cache (the
fallback path), and com.microsoft GroupQueryAttention (the dense baseline).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper

from ragtop.export import ops

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, domains: dict[str, int], initializers=(), functions=()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, v) for d, v in domains.items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10, functions=list(functions))
    return model.SerializeToString()


def topk_attention_model(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    topk: int,
    block_size: int = 0,
    block_budget: int = 0,
    sink_tokens: int | None = None,
    local_window: int | None = None,
    with_function: bool = False,
    attention_dense: bool = False,
    kv_dtype: str = "fp32",
    paged: bool = False,
) -> bytes:
    """One ragtop::TopKAttention node; block mode adds the summary inputs/outputs.

    sink_tokens / local_window None: the attribute is left out (as in files written before
    it existed). with_function: the file carries the op's standard-op body, so a stock
    onnxruntime (no plugin) runs it. attention_dense: the node takes the optional per-sequence
    dense flag (graph input `attention_dense` [B] int64; exact mode passes empty summaries).
    kv_dtype "fp16": past/present key/value are float16 (the summaries stay float).
    paged: the cache inputs are page pools [N, Hkv, P, Dh] read through the input
    `block_table` [B, M] (ops.py input 9; implies attention_dense).
    """
    attention_dense = attention_dense or paged
    hd, kvd = num_heads * head_dim, num_kv_heads * head_dim
    cache = ["N", num_kv_heads, "P", head_dim] if paged else ["B", num_kv_heads, "C", head_dim]
    KV = TensorProto.FLOAT16 if kv_dtype == "fp16" else F
    inputs = [
        helper.make_tensor_value_info("query", F, ["B", "S", hd]),
        helper.make_tensor_value_info("key", F, ["B", "S", kvd]),
        helper.make_tensor_value_info("value", F, ["B", "S", kvd]),
        helper.make_tensor_value_info("past_key", KV, cache),
        helper.make_tensor_value_info("past_value", KV, cache),
        helper.make_tensor_value_info("past_lengths", I64, ["B"]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", F, ["B", "S", hd]),
        helper.make_tensor_value_info("present_key", KV, cache),
        helper.make_tensor_value_info("present_value", KV, cache),
    ]
    if block_size:
        summary = ["N", num_kv_heads, "PB", head_dim] if paged else ["B", num_kv_heads, "NB", head_dim]
        inputs += [helper.make_tensor_value_info(n, F, summary) for n in ("past_key_min", "past_key_max")]
        outputs += [helper.make_tensor_value_info(n, F, summary) for n in ("present_key_min", "present_key_max")]
    names, inits = [i.name for i in inputs], []
    if attention_dense:
        if not block_size:  # exact mode: empty tensors in the summaries' places (ops.py)
            inits.append(onnx.numpy_helper.from_array(np.zeros(0, np.float32), ops.NO_BLOCK_SUMMARY))
            names += [ops.NO_BLOCK_SUMMARY] * 2
        names.append(ops.ATTENTION_DENSE)
        inputs.append(helper.make_tensor_value_info(ops.ATTENTION_DENSE, I64, ["B"]))
    if paged:
        names.append(ops.BLOCK_TABLE)
        inputs.append(helper.make_tensor_value_info(ops.BLOCK_TABLE, I64, ["B", "M"]))
    node = helper.make_node(
        ops.TOPK_ATTENTION,
        names,
        [o.name for o in outputs],
        domain=ops.DOMAIN,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        topk=topk,
        scale=head_dim**-0.5,
        block_size=block_size,
        block_budget=block_budget,
        **{k: v for k, v in dict(sink_tokens=sink_tokens, local_window=local_window).items() if v is not None},
    )
    body = []
    if with_function:
        from ragtop.export.functions import paged_topk_attention_function, topk_attention_function

        mode = "block" if block_size else "exact"
        kv_cast = kv_dtype == "fp16"
        body = [
            paged_topk_attention_function(mode, 21, kv_cast=kv_cast)
            if paged
            else topk_attention_function(mode, 21, dense_flag=attention_dense, kv_cast=kv_cast)
        ]
    return _model([node], inputs, outputs, {ops.DOMAIN: ops.OPSET_VERSION}, initializers=inits, functions=body)


def ragged_embedding_model(tables, projs, tier_of, row_of) -> bytes:
    """One ragtop::RaggedEmbedding node with the tiers' weights as initializers."""
    inits = [onnx.numpy_helper.from_array(tier_of, "tier_of"), onnx.numpy_helper.from_array(row_of, "row_of")]
    names = ["input_ids", "tier_of", "row_of"]
    for i, (t, p) in enumerate(zip(tables, projs, strict=True)):
        inits += [onnx.numpy_helper.from_array(t, f"table_{i}"), onnx.numpy_helper.from_array(p, f"proj_{i}")]
        names += [f"table_{i}", f"proj_{i}"]
    node = helper.make_node(ops.RAGGED_EMBEDDING, names, ["embeddings"], domain=ops.DOMAIN, num_tiers=len(tables))
    return _model(
        [node],
        [helper.make_tensor_value_info("input_ids", I64, ["B", "S"])],
        [helper.make_tensor_value_info("embeddings", F, ["B", "S", projs[0].shape[0]])],
        {ops.DOMAIN: ops.OPSET_VERSION},
        inits,
    )


def matmul_blocks_model(q, k: int, level: int, standard: bool = False) -> bytes:
    """One ragtop::MatMulBlocks node, y = A [M, k] @ W^T for W given as quant.QBlocks (codes,
    scales, optional zero points and mins as initializers), with its function body; or,
    `standard`, that body inlined: com.microsoft::MatMulNBits (+ the minima nodes), the
    subgraph an export without the op holds (export --matmul standard)."""
    from ragtop.export.functions import matmul_blocks_function

    n, nb = q.scales.shape
    inits = [onnx.numpy_helper.from_array(q.packed_codes(), "B"), onnx.numpy_helper.from_array(q.scales, "scales")]
    names = ["A", "B", "scales", ""]
    if q.zero_points is not None:
        inits.append(onnx.numpy_helper.from_array(q.packed_zero_points(), "zero_points"))
        names[3] = "zero_points"
    if q.mins is not None:
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(q.mins.T), "mins"))  # [nb, N]
        names.append("mins")
    attrs = dict(K=k, N=n, bits=q.bits, block_size=ops.MATMUL_BLOCK, accuracy_level=level)
    node = helper.make_node(ops.MATMUL_BLOCKS, names, ["Y"], domain=ops.DOMAIN, **attrs)
    if q.mins is not None:
        node.overload = ops.MATMUL_BLOCKS_MINS
    body = matmul_blocks_function(21, q.mins is not None, padded=k % ops.MATMUL_BLOCK != 0)
    model = onnx.ModelProto.FromString(
        _model(
            [node],
            [helper.make_tensor_value_info("A", F, ["M", k])],
            [helper.make_tensor_value_info("Y", F, ["M", n])],
            {ops.DOMAIN: ops.OPSET_VERSION, ops.MS_DOMAIN: 1},
            inits,
            [body],
        )
    )
    if standard:
        model = onnx.inliner.inline_local_functions(model)
    return model.SerializeToString()


def fallback_attention_model(
    num_heads: int, num_kv_heads: int, head_dim: int, topk: int | None, capacity: int
) -> bytes:
    """Exact top-k attention over a shared cache in standard ONNX ops (the fallback path).

    topk=None gives plain dense attention in the same ops (Softmax over all visible keys).

    Same inputs/outputs as the custom node in exact mode: the new keys/values are scattered
    into the cache at past_lengths (in place when present is bound to past's buffer), the
    GQA heads of a KV head are scored in one MatMul, invisible keys masked with -inf, TopK
    keeps k per row (ties: lower index, as ONNX specifies), the softmax over the kept scores
    is scattered back to a [.., C] row and multiplied with V.
    """
    H, Hkv, Dh, C = num_heads, num_kv_heads, head_dim, capacity
    G, k = H // Hkv, min(topk or capacity, capacity)
    cache = ["B", Hkv, C, Dh]
    inputs = [
        helper.make_tensor_value_info("query", F, ["B", "S", H * Dh]),
        helper.make_tensor_value_info("key", F, ["B", "S", Hkv * Dh]),
        helper.make_tensor_value_info("value", F, ["B", "S", Hkv * Dh]),
        helper.make_tensor_value_info("past_key", F, cache),
        helper.make_tensor_value_info("past_value", F, cache),
        helper.make_tensor_value_info("past_lengths", I64, ["B"]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", F, ["B", "S", H * Dh]),
        helper.make_tensor_value_info("present_key", F, cache),
        helper.make_tensor_value_info("present_value", F, cache),
    ]
    const = lambda name, arr: onnx.numpy_helper.from_array(arr, name)  # noqa: E731
    inits = [
        const("zero", np.array(0, np.int64)),
        const("one", np.array(1, np.int64)),
        const("ax2", np.array([2], np.int64)),
        const("ax_last", np.array([-1], np.int64)),
        const("keys_idx", np.arange(C, dtype=np.int64)),
        const("kv_heads_shape", np.array([0, 0, Hkv, Dh], np.int64)),
        const("q_heads_shape", np.array([0, 0, Hkv, G, Dh], np.int64)),
        const("k", np.array([k], np.int64)),
        const("neg_inf", np.array(-np.inf, np.float32)),
        const("zero_f", np.array(0.0, np.float32)),
        const("out_shape", np.array([0, 0, H * Dh], np.int64)),
        const("ax_pos", np.array([1, 3], np.int64)),
        const("ax_mask", np.array([1, 2], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        # positions [B,S] = past_lengths[:, None] + arange(S)
        n("Shape", ["query"], ["q_shape"]),
        n("Gather", ["q_shape", "one"], ["S"], axis=0),
        n("Range", ["zero", "S", "one"], ["arange_s"]),
        n("Unsqueeze", ["past_lengths", "ax_last"], ["lens_col"]),
        n("Add", ["lens_col", "arange_s"], ["pos"]),  # [B,S]
        # cache write: indices [B,Hkv,S,Dh]
        n("Reshape", ["key", "kv_heads_shape"], ["k4"]),
        n("Transpose", ["k4"], ["k_new"], perm=[0, 2, 1, 3]),
        n("Reshape", ["value", "kv_heads_shape"], ["v4"]),
        n("Transpose", ["v4"], ["v_new"], perm=[0, 2, 1, 3]),
        n("Unsqueeze", ["pos", "ax_pos"], ["pos4"]),  # [B,1,S,1]
        n("Shape", ["k_new"], ["kn_shape"]),
        n("Expand", ["pos4", "kn_shape"], ["widx"]),
        n("ScatterElements", ["past_key", "widx", "k_new"], ["present_key"], axis=2),
        n("ScatterElements", ["past_value", "widx", "v_new"], ["present_value"], axis=2),
        # scores [B,Hkv,G,S,C]
        n("Reshape", ["query", "q_heads_shape"], ["q5"]),
        n("Transpose", ["q5"], ["qh"], perm=[0, 2, 3, 1, 4]),
        n("Constant", [], ["scale"], value=onnx.numpy_helper.from_array(np.array(Dh**-0.5, np.float32))),
        n("Mul", ["qh", "scale"], ["qs"]),
        n("Unsqueeze", ["present_key", "ax2"], ["k5"]),  # [B,Hkv,1,C,Dh]
        n("Transpose", ["k5"], ["kT"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["qs", "kT"], ["scores"]),
        # visibility: key j <= pos(s)  -> [B,1,1,S,C]
        n("Unsqueeze", ["pos", "ax_last"], ["pos3"]),  # [B,S,1]
        n("LessOrEqual", ["keys_idx", "pos3"], ["vis3"]),
        n("Unsqueeze", ["vis3", "ax_mask"], ["vis"]),
        n("Where", ["vis", "scores", "neg_inf"], ["masked"]),
    ]
    if topk is None:
        nodes.append(n("Softmax", ["masked"], ["probs"], axis=-1))
    else:
        nodes += [
            n("TopK", ["masked", "k"], ["top_vals", "top_idx"], axis=-1, largest=1, sorted=1),
            n("Softmax", ["top_vals"], ["w"], axis=-1),
            n("Shape", ["scores"], ["scores_shape"]),
            n("Expand", ["zero_f", "scores_shape"], ["zeros"]),
            n("ScatterElements", ["zeros", "top_idx", "w"], ["probs"], axis=-1),
        ]
    nodes += [
        n("Unsqueeze", ["present_value", "ax2"], ["v5"]),
        n("MatMul", ["probs", "v5"], ["o5"]),  # [B,Hkv,G,S,Dh]
        n("Transpose", ["o5"], ["o_t"], perm=[0, 3, 1, 2, 4]),
        n("Reshape", ["o_t", "out_shape"], ["output"]),
    ]
    used = {name for node in nodes for name in node.input}
    return _model(nodes, inputs, outputs, {}, [i for i in inits if i.name in used])


def gqa_model(num_heads: int, num_kv_heads: int, head_dim: int) -> bytes:
    """com.microsoft GroupQueryAttention (dense), for a past/present shared buffer."""
    H, Hkv, Dh = num_heads, num_kv_heads, head_dim
    cache = ["B", Hkv, "C", Dh]
    inputs = [
        helper.make_tensor_value_info("query", F, ["B", "S", H * Dh]),
        helper.make_tensor_value_info("key", F, ["B", "S", Hkv * Dh]),
        helper.make_tensor_value_info("value", F, ["B", "S", Hkv * Dh]),
        helper.make_tensor_value_info("past_key", F, cache),
        helper.make_tensor_value_info("past_value", F, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", F, ["B", "S", H * Dh]),
        helper.make_tensor_value_info("present_key", F, cache),
        helper.make_tensor_value_info("present_value", F, cache),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        [i.name for i in inputs],
        [o.name for o in outputs],
        domain="com.microsoft",
        num_heads=H,
        kv_num_heads=Hkv,
        scale=Dh**-0.5,
    )
    return _model([node], inputs, outputs, {"com.microsoft": 1})
