"""Single-node ONNX graphs for the plugin kernels and the attention baselines.

Used by `ragtop bench ops` and tests/plugins: a graph holding just one ragtop custom node
(domain `ragtop`, version 1), a standard-op exact top-k attention over a shared cache (the
fallback path), and com.microsoft GroupQueryAttention (the dense baseline).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ragtop.export import ops

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, domains: dict[str, int], initializers=()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, v) for d, v in domains.items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return model.SerializeToString()


def topk_attention_model(num_heads: int, num_kv_heads: int, head_dim: int, topk: int,
                         block_size: int = 0, block_budget: int = 0) -> bytes:
    """One ragtop::TopKAttention node; block mode adds the summary inputs/outputs."""
    hd, kvd = num_heads * head_dim, num_kv_heads * head_dim
    cache = ["B", num_kv_heads, "C", head_dim]
    inputs = [
        helper.make_tensor_value_info("query", F, ["B", "S", hd]),
        helper.make_tensor_value_info("key", F, ["B", "S", kvd]),
        helper.make_tensor_value_info("value", F, ["B", "S", kvd]),
        helper.make_tensor_value_info("past_key", F, cache),
        helper.make_tensor_value_info("past_value", F, cache),
        helper.make_tensor_value_info("past_lengths", I64, ["B"]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", F, ["B", "S", hd]),
        helper.make_tensor_value_info("present_key", F, cache),
        helper.make_tensor_value_info("present_value", F, cache),
    ]
    if block_size:
        summary = ["B", num_kv_heads, "NB", head_dim]
        inputs += [helper.make_tensor_value_info(n, F, summary) for n in ("past_key_min", "past_key_max")]
        outputs += [helper.make_tensor_value_info(n, F, summary) for n in ("present_key_min", "present_key_max")]
    node = helper.make_node(
        ops.TOPK_ATTENTION, [i.name for i in inputs], [o.name for o in outputs], domain=ops.DOMAIN,
        num_heads=num_heads, num_kv_heads=num_kv_heads, topk=topk, scale=head_dim**-0.5,
        block_size=block_size, block_budget=block_budget,
    )
    return _model([node], inputs, outputs, {ops.DOMAIN: ops.OPSET_VERSION})


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
