"""Every variant exports in both --ops modes, passes the full ONNX checker, and a stock
onnxruntime (no plugin) matches PyTorch, including a cached greedy decode and a batch of
sequences at different lengths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from tiny_models import CYCLE, PROMPT, VARIANTS, tiny_model

from ragtop.convert.sparsify import with_attention
from ragtop.export import functions, ops
from ragtop.export.onnx import export_graph, make_spec, save_model
from ragtop.export.verify import SharedCacheRunner, block_summaries, onnx_feeds, session, validate
from ragtop.model import AttentionConfig, KVCache

ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(attention: str, embedding: str, ops_mode: str):
        key = (attention, embedding, ops_mode)
        if key not in cache:
            model = tiny_model(attention, embedding)
            spec = make_spec(model, model.config.max_seq_len, ops_mode, "fp32", 18)
            proto = export_graph(model, spec)
            path = tmp_path_factory.mktemp("onnx") / "model.onnx"
            save_model(proto, path)
            cache[key] = model, spec, path
        return cache[key]

    return get


@pytest.mark.parametrize("ops_mode", ["custom", "standard"])
@pytest.mark.parametrize("attention,embedding", VARIANTS)
def test_export_matches_pytorch(exported, attention, embedding, ops_mode):
    model, spec, path = exported(attention, embedding, ops_mode)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    custom = [n for n in proto.graph.node if n.domain == ops.DOMAIN]
    if ops_mode == "standard":
        assert not custom and not proto.functions
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    else:
        functions_by_key = {(f.domain, f.name) for f in proto.functions}
        assert {n.op_type for n in custom} == {ops.TOPK_ATTENTION} | (
            {ops.RAGGED_EMBEDDING} if embedding == "ragged" else set()
        )
        assert all((n.domain, n.op_type) in functions_by_key for n in custom)
        assert sum(n.op_type == ops.TOPK_ATTENTION for n in custom) == model.config.n_layers
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "past_lengths", "logits_indices"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in proto.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    # dynamic batch / sequence / capacity / logits count
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.key"][0] == "batch" and dims["past_key_values.1.key"][2] == "capacity"

    v = validate(model, session(path), spec, ATOL, prompt=PROMPT, greedy_tokens=32)
    assert v.passed, v.table()
    assert [c.name for c in v.cases] == ["prefill", "decode", "mixed_batch", "empty_batch"]
    assert v.greedy_onnx == v.greedy_torch and len(set(v.greedy_torch)) > 1


@pytest.mark.parametrize("ops_mode", ["custom", "standard"])
@pytest.mark.parametrize("attention", ["topk-sinks", "block-sinks"])
def test_dense_flag_runs_the_dense_model(exported, attention, ops_mode):
    """A top-k graph's attention_dense input (default [0]: sparse) makes the flagged
    sequences attend densely: the same file computes the model under dense attention
    (the verification pass of self-speculative decoding), sequence by sequence."""
    model, spec, path = exported(attention, "uniform", ops_mode)
    proto = onnx.load(str(path))
    assert proto.graph.input[-1].name == ops.ATTENTION_DENSE
    assert ops.ATTENTION_DENSE in {t.name for t in proto.graph.initializer}  # its default
    sess = session(path)
    dense_model = with_attention(model, AttentionConfig())
    ids = torch.tensor([CYCLE[:20], CYCLE[::-1][:20]])  # [2, 20]: long enough for selection to matter
    cache = KVCache.allocate(model.config, 2, 32)
    keep = torch.arange(20).expand(2, 20)
    feeds = onnx_feeds(spec, ids, cache, keep)
    with torch.no_grad():
        sparse, dense = model(ids), dense_model(ids)
    assert (sparse - dense).abs().max() > 1e-3  # the case tells them apart
    logits = sess.run(["logits"], feeds)[0]  # the default: sparse
    np.testing.assert_allclose(logits, sparse.numpy(), atol=ATOL)
    logits = sess.run(["logits"], {**feeds, ops.ATTENTION_DENSE: np.array([0, 1])})[0]
    np.testing.assert_allclose(logits[0], sparse[0].numpy(), atol=ATOL)
    np.testing.assert_allclose(logits[1], dense[1].numpy(), atol=ATOL)


def test_shared_buffers_are_updated_in_place(exported):
    """present.* bound to the past buffers: onnxruntime writes the new positions into them."""
    model, spec, path = exported("block", "ragged", "custom")
    runner = SharedCacheRunner(session(path), spec, batch=2, capacity=16)
    before = {k: id(v) for k, v in runner.buffers.items()}
    ids = np.array([[3, 4, 5], [6, 7, 8]])
    runner.step(ids, last_only=False)
    cache = KVCache.allocate(model.config, 2, 16)
    with torch.no_grad():
        model(torch.from_numpy(ids), cache=cache)
    for i in range(model.config.n_layers):
        got = runner.buffers[f"{i}.key"].numpy()
        torch.testing.assert_close(torch.from_numpy(got), cache.keys[i], atol=ATOL, rtol=0)
        kmin, _ = block_summaries(cache.keys[i], cache.lengths, spec.block_size)
        torch.testing.assert_close(torch.from_numpy(runner.buffers[f"{i}.key_min"].numpy()), kmin, atol=ATOL, rtol=0)
    assert {k: id(v) for k, v in runner.buffers.items()} == before
    assert runner.lengths.tolist() == [3, 3]


def test_dense_model_uses_the_dense_body():
    assert functions.attention_mode(None, None, 64) == "dense"
    assert functions.attention_mode(64, None, 64) == "dense"  # topk covers every key
    assert functions.attention_mode(8, None, 64) == "exact"
    assert functions.attention_mode(8, 16, 64) == "block"
    dense = functions.topk_attention_function("dense", 18)
    assert not any(n.op_type == "TopK" for n in dense.node)
    block = functions.topk_attention_function("block", 18)
    assert list(block.input)[-2:] == ["past_key_min", "past_key_max"] and len(block.output) == 5


def test_sequence_axis_is_not_fixed_by_decode(exported):
    """A prefill of 9 tokens and decodes of 1 run through the same graph (S is dynamic)."""
    model, spec, path = exported("topk", "uniform", "custom")
    runner = SharedCacheRunner(session(path), spec, batch=1, capacity=12)
    assert runner.step(np.arange(9)[None], last_only=False).shape == (1, 9, model.config.vocab_size)
    assert runner.step(np.array([[4]])).shape == (1, 1, model.config.vocab_size)


def test_external_data(exported, tmp_path):
    """Large models keep their weights in model.onnx.data; onnxruntime loads them from there."""
    model, spec, path = exported("topk", "uniform", "custom")
    out = tmp_path / "model.onnx"
    save_model(onnx.load(str(path)), out, force_external=True)
    stored = onnx.load(str(out), load_external_data=False).graph.initializer
    external = [t for t in stored if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and (tmp_path / "model.onnx.data").stat().st_size >= sum(np.prod(t.dims) * 4 for t in external)
    runner = SharedCacheRunner(session(out), spec, batch=1, capacity=8)
    with torch.no_grad():
        want = model(torch.tensor([[1, 2, 3]]))[:, -1:]
    torch.testing.assert_close(torch.from_numpy(runner.step(np.array([[1, 2, 3]]))), want, atol=ATOL, rtol=0)
