"""The onnxruntime plugin kernels against the PyTorch reference (ragtop.model).

Each graph holds one ragtop custom node; the reference is TopKAttention.attend (exact and
block selection) and RaggedEmbedding.forward. Skipped when the library is not built.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragtop.bench.graphs import ragged_embedding_model, topk_attention_model
from ragtop.model import (
    AttentionConfig,
    EmbeddingConfig,
    ModelConfig,
    RaggedEmbedding,
    TopKAttention,
)
from ragtop.model.attention import AttnContext, write_cache
from ragtop.runtime.plugin import plugin_library_path, register_plugin

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    plugin_library_path() is None, reason="plugin library not built (run `make install` with g++ and network to apt)"
)
TOL = dict(atol=1e-5, rtol=1e-5)


def session(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    assert register_plugin(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def reference(q, k, v, past_k, past_v, lens, H, Hkv, topk, block_size=0, block_budget=0, sink=0, window=0, dense=None):
    """TopKAttention.attend over the cache after writing the new keys: (out, present_k, present_v).
    dense: [B] flags of the sequences that attend densely (the op's attention_dense)."""
    B, S, _ = q.shape
    C, Dh = past_k.shape[2], past_k.shape[3]
    att = AttentionConfig(
        kind="topk",
        topk=topk,
        block_size=block_size or None,
        block_budget=block_budget or None,
        sink_tokens=sink,
        local_window=window,
    )
    cfg = ModelConfig(
        vocab_size=8,
        d_model=H * Dh,
        n_layers=1,
        n_heads=H,
        n_kv_heads=Hkv,
        d_ff=8,
        max_seq_len=C,
        head_dim=Dh,
        attention=att,
    )
    attn = TopKAttention(cfg)
    lens_t = torch.from_numpy(lens)
    kc, vc = torch.from_numpy(past_k.copy()), torch.from_numpy(past_v.copy())
    to_heads = lambda x, h: torch.from_numpy(x).view(B, S, h, Dh).transpose(1, 2)  # noqa: E731
    kf, vf = write_cache((kc, vc), to_heads(k, Hkv), to_heads(v, Hkv), lens_t)  # float16 cache: stored rounded
    positions = lens_t[:, None] + torch.arange(S)
    visible = (torch.arange(C)[None, None, :] <= positions[:, :, None])[:, None]
    dense_rows = None if dense is None else torch.from_numpy(np.asarray(dense) != 0)
    ctx = AttnContext(None, None, positions, visible, lens_t, causal=False, dense_rows=dense_rows)
    with torch.no_grad():
        out = attn.attend(to_heads(q, H), kf, vf, ctx)
    return out.transpose(1, 2).reshape(B, S, H * Dh).numpy(), kc.numpy(), vc.numpy()


def summaries(keys, lengths, bs):
    """Element-wise min/max of each block's written keys ([B,Hkv,C/bs,Dh]); unwritten blocks NaN."""
    B, Hkv, C, Dh = keys.shape
    lo = np.full((B, Hkv, C // bs, Dh), np.nan, np.float32)
    hi = lo.copy()
    for b in range(B):
        for blk in range(-(-int(lengths[b]) // bs)):
            rows = keys[b, :, blk * bs : min((blk + 1) * bs, int(lengths[b]))]
            lo[b, :, blk], hi[b, :, blk] = rows.min(1), rows.max(1)
    return lo, hi


def random_case(rng, B, S, H, Hkv, Dh, C, lens):
    q = rng.standard_normal((B, S, H * Dh), dtype=np.float32)
    k = rng.standard_normal((B, S, Hkv * Dh), dtype=np.float32)
    v = rng.standard_normal((B, S, Hkv * Dh), dtype=np.float32)
    past_k = rng.standard_normal((B, Hkv, C, Dh), dtype=np.float32)  # garbage beyond lens: never visible
    past_v = rng.standard_normal((B, Hkv, C, Dh), dtype=np.float32)
    return q, k, v, past_k, past_v, np.asarray(lens, dtype=np.int64)


def run_plugin(sess, q, k, v, past_k, past_v, lens, kmin=None, kmax=None):
    feeds = dict(query=q, key=k, value=v, past_key=past_k, past_value=past_v, past_lengths=lens)
    if kmin is not None:
        feeds.update(past_key_min=kmin, past_key_max=kmax)
    return sess.run(None, feeds)


EXACT_CASES = [  # B, S, H, Hkv, Dh, C, lens, topk
    (1, 1, 4, 4, 16, 64, [40], 8),  # decode
    (2, 1, 6, 2, 8, 80, [0, 79], 5),  # decode, empty cache and a full one, GQA
    (1, 37, 4, 2, 16, 64, [0], 7),  # prefill from empty
    (3, 5, 3, 1, 8, 48, [10, 0, 31], 4),  # mixed lengths, chunked append
    (2, 9, 4, 2, 12, 40, [7, 25], 6),  # head dim not a multiple of 8 (scalar tail path)
    (2, 70, 2, 2, 8, 128, [3, 50], 16),  # prefill longer than one query chunk
    (2, 3, 4, 2, 8, 32, [2, 20], 1000),  # k >= visible keys: exactly dense
]


@pytest.mark.parametrize("B,S,H,Hkv,Dh,C,lens,topk", EXACT_CASES)
def test_exact_matches_reference(B, S, H, Hkv, Dh, C, lens, topk):
    rng = np.random.default_rng(B * 1000 + S)
    case = random_case(rng, B, S, H, Hkv, Dh, C, lens)
    out, pk, pv = run_plugin(session(topk_attention_model(H, Hkv, Dh, topk)), *case)
    ref_out, ref_k, ref_v = reference(*case, H, Hkv, topk)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_array_equal(pk, ref_k)
    np.testing.assert_array_equal(pv, ref_v)


def test_in_place_cache_matches_separate_buffers():
    """present bound to past's memory (IO binding): only new positions are written."""
    H, Hkv, Dh, C, topk = 4, 2, 16, 64, 6
    sess = session(topk_attention_model(H, Hkv, Dh, topk))
    rng = np.random.default_rng(7)
    q, k, v, past_k, past_v, lens = random_case(rng, 2, 3, H, Hkv, Dh, C, [5, 17])
    ref_out, ref_k, ref_v = run_plugin(sess, q, k, v, past_k, past_v, lens)  # separate outputs

    kbuf, vbuf = past_k.copy(), past_v.copy()
    kval, vval = ort.OrtValue.ortvalue_from_numpy(kbuf), ort.OrtValue.ortvalue_from_numpy(vbuf)
    io = sess.io_binding()
    for name, arr in dict(query=q, key=k, value=v, past_lengths=lens).items():
        io.bind_cpu_input(name, arr)
    io.bind_output("output")  # outputs come back in binding order
    io.bind_ortvalue_input("past_key", kval)
    io.bind_ortvalue_input("past_value", vval)
    io.bind_ortvalue_output("present_key", kval)
    io.bind_ortvalue_output("present_value", vval)
    sess.run_with_iobinding(io)
    np.testing.assert_allclose(io.copy_outputs_to_cpu()[0], ref_out, **TOL)
    np.testing.assert_array_equal(kval.numpy(), ref_k)
    np.testing.assert_array_equal(vval.numpy(), ref_v)
    assert kval.data_ptr() == ort.OrtValue.ortvalue_from_numpy(kbuf).data_ptr()


BLOCK_CASES = [  # B, S, H, Hkv, Dh, C, lens, topk, block_size, budget
    (1, 1, 4, 4, 16, 128, [100], 8, 8, 3),  # decode
    (2, 1, 6, 2, 8, 96, [0, 95], 5, 16, 2),  # empty cache, full cache, GQA
    (1, 40, 4, 2, 16, 64, [0], 6, 8, 2),  # prefill from empty
    (3, 6, 3, 1, 8, 64, [9, 0, 33], 4, 4, 5),  # mixed lengths, blocks filled mid-call
    (2, 20, 2, 2, 8, 64, [3, 30], 1000, 8, 1),  # k >= candidate keys
]


@pytest.mark.parametrize("B,S,H,Hkv,Dh,C,lens,topk,bs,budget", BLOCK_CASES)
def test_block_selection_matches_reference(B, S, H, Hkv, Dh, C, lens, topk, bs, budget):
    rng = np.random.default_rng(B * 1000 + S + 1)
    q, k, v, past_k, past_v, lens = random_case(rng, B, S, H, Hkv, Dh, C, lens)
    kmin, kmax = summaries(past_k, lens, bs)
    kmin, kmax = np.nan_to_num(kmin, nan=0.0), np.nan_to_num(kmax, nan=0.0)
    sess = session(topk_attention_model(H, Hkv, Dh, topk, bs, budget))
    out, pk, pv, new_min, new_max = run_plugin(sess, q, k, v, past_k, past_v, lens, kmin, kmax)
    ref_out, ref_k, _ = reference(q, k, v, past_k, past_v, lens, H, Hkv, topk, bs, budget)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_array_equal(pk, ref_k)
    want_min, want_max = summaries(ref_k, lens + S, bs)
    written = ~np.isnan(want_min)
    np.testing.assert_array_equal(new_min[written], want_min[written])
    np.testing.assert_array_equal(new_max[written], want_max[written])


def test_block_budget_covering_all_blocks_is_exact():
    H, Hkv, Dh, C, topk, bs = 4, 2, 8, 64, 6, 8
    rng = np.random.default_rng(3)
    q, k, v, past_k, past_v, lens = random_case(rng, 2, 9, H, Hkv, Dh, C, [20, 47])
    kmin, kmax = (np.nan_to_num(x) for x in summaries(past_k, lens, bs))
    blocks = session(topk_attention_model(H, Hkv, Dh, topk, bs, C // bs))
    exact = session(topk_attention_model(H, Hkv, Dh, topk))
    out_b = run_plugin(blocks, q, k, v, past_k, past_v, lens, kmin, kmax)[0]
    out_e = run_plugin(exact, q, k, v, past_k, past_v, lens)[0]
    np.testing.assert_allclose(out_b, out_e, **TOL)


def test_incremental_decode_in_place_with_blocks():
    """Prefill then decode steps on one shared buffer set: summaries stay exact."""
    H, Hkv, Dh, C, topk, bs, budget = 4, 2, 8, 64, 5, 8, 2
    sess = session(topk_attention_model(H, Hkv, Dh, topk, bs, budget))
    rng = np.random.default_rng(11)
    bufs = {n: np.zeros((2, Hkv, C, Dh), np.float32) for n in ("past_key", "past_value")}
    bufs.update({n: np.zeros((2, Hkv, C // bs, Dh), np.float32) for n in ("past_key_min", "past_key_max")})
    vals = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in bufs.items()}
    ref_k, ref_v = np.zeros_like(bufs["past_key"]), np.zeros_like(bufs["past_value"])
    lens = np.array([0, 3], np.int64)
    for S in (13, 1, 1, 4, 1):
        q, k, v, *_ = random_case(rng, 2, S, H, Hkv, Dh, 1, [0, 0])
        io = sess.io_binding()
        for name, arr in dict(query=q, key=k, value=v, past_lengths=lens).items():
            io.bind_cpu_input(name, arr)
        io.bind_output("output")
        for n, val in vals.items():
            io.bind_ortvalue_input(n, val)
            io.bind_ortvalue_output(n.replace("past", "present"), val)
        sess.run_with_iobinding(io)
        want, ref_k, ref_v = reference(q, k, v, ref_k, ref_v, lens, H, Hkv, topk, bs, budget)
        np.testing.assert_allclose(io.copy_outputs_to_cpu()[0], want, **TOL)
        lens = lens + S
    lo, hi = summaries(ref_k, lens, bs)
    written = ~np.isnan(lo)
    np.testing.assert_array_equal(vals["past_key_min"].numpy()[written], lo[written])
    np.testing.assert_array_equal(vals["past_key_max"].numpy()[written], hi[written])


def stock_session(model: bytes) -> ort.InferenceSession:
    """No plugin: onnxruntime inlines the file's standard-op function body."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


SELECTION_CASES = [  # B, S, H, Hkv, Dh, C, lens, topk, block_size, budget, sink, window
    (1, 1, 4, 4, 16, 128, [100], 8, 0, 0, 4, 16),  # exact decode, sinks + window
    (2, 9, 4, 2, 12, 64, [7, 40], 5, 0, 0, 3, 0),  # exact prefill, sinks only
    (2, 70, 2, 2, 8, 128, [3, 50], 6, 0, 0, 0, 20),  # exact, window only, > one query chunk
    (2, 3, 4, 2, 8, 48, [2, 40], 1000, 0, 0, 2, 5),  # k >= candidates: dense
    (1, 1, 4, 4, 16, 128, [100], 8, 8, 3, 8, 16),  # blocks: decode, sink = the first block
    (2, 1, 6, 2, 8, 96, [0, 95], 5, 16, 2, 5, 20),  # blocks: sink/window mid-block, GQA
    (1, 40, 4, 2, 16, 64, [0], 6, 8, 2, 3, 9),  # blocks: prefill from empty
    (3, 6, 3, 1, 8, 64, [9, 0, 33], 4, 4, 5, 2, 3),  # blocks: mixed lengths
    (2, 20, 2, 2, 8, 64, [3, 30], 1000, 8, 2, 4, 12),  # blocks, all keys of chosen blocks (Quest)
    (2, 5, 4, 2, 8, 64, [30, 55], 3, 8, 1, 40, 30),  # sinks and window overlap: everything kept
    (1, 4, 4, 2, 8, 64, [50], 64, 8, 8, 0, 0),  # dense via block mode: topk >= C, budget >= C / bs
]


@pytest.mark.parametrize("B,S,H,Hkv,Dh,C,lens,topk,bs,budget,sink,window", SELECTION_CASES)
def test_sinks_and_window_kernel_body_and_reference_agree(B, S, H, Hkv, Dh, C, lens, topk, bs, budget, sink, window):
    """The C++ kernel, the standard-op function body and the PyTorch reference: one semantics."""
    rng = np.random.default_rng(B * 1000 + S + 7 * sink + window)
    q, k, v, past_k, past_v, lens = random_case(rng, B, S, H, Hkv, Dh, C, lens)
    sums = [np.nan_to_num(x) for x in summaries(past_k, lens, bs)] if bs else []
    model = topk_attention_model(H, Hkv, Dh, topk, bs, budget, sink, window, with_function=True)
    ref_out, ref_k, _ = reference(q, k, v, past_k, past_v, lens, H, Hkv, topk, bs, budget, sink, window)
    for sess in (session(model), stock_session(model)):
        got = run_plugin(sess, q, k, v, past_k, past_v, lens, *sums)
        np.testing.assert_allclose(got[0], ref_out, **TOL)
        np.testing.assert_array_equal(got[1], ref_k)
        if bs:
            want_min, want_max = summaries(ref_k, lens + S, bs)
            written = ~np.isnan(want_min)
            np.testing.assert_array_equal(got[3][written], want_min[written])
            np.testing.assert_array_equal(got[4][written], want_max[written])


def test_sinks_and_window_change_the_output():
    """Always-kept keys matter: the result differs from plain top-k, and a window covering
    every key is dense."""
    H, Hkv, Dh, C = 4, 2, 8, 64
    rng = np.random.default_rng(5)
    case = random_case(rng, 1, 1, H, Hkv, Dh, C, [60])
    plain = run_plugin(session(topk_attention_model(H, Hkv, Dh, 4)), *case)[0]
    kept = run_plugin(session(topk_attention_model(H, Hkv, Dh, 4, 0, 0, 4, 8)), *case)[0]
    whole = run_plugin(session(topk_attention_model(H, Hkv, Dh, 4, 0, 0, 0, C)), *case)[0]
    dense = run_plugin(session(topk_attention_model(H, Hkv, Dh, C)), *case)[0]
    assert np.abs(kept - plain).max() > 1e-3
    np.testing.assert_allclose(whole, dense, **TOL)


@pytest.mark.parametrize("bs,budget", [(0, 0), (8, 2)])
def test_files_without_the_new_attributes_mean_zero(bs, budget):
    """A node written before sink_tokens / local_window existed runs as with both 0, in the
    kernel and in the function body."""
    H, Hkv, Dh, C = 4, 2, 8, 64
    rng = np.random.default_rng(9)
    q, k, v, past_k, past_v, lens = random_case(rng, 2, 3, H, Hkv, Dh, C, [20, 47])
    sums = [np.nan_to_num(x) for x in summaries(past_k, lens, bs)] if bs else []
    old = topk_attention_model(H, Hkv, Dh, 5, bs, budget, with_function=True)
    new = topk_attention_model(H, Hkv, Dh, 5, bs, budget, 0, 0, with_function=True)
    want = run_plugin(session(new), q, k, v, past_k, past_v, lens, *sums)[0]
    for sess in (session(old), stock_session(old)):
        np.testing.assert_allclose(run_plugin(sess, q, k, v, past_k, past_v, lens, *sums)[0], want, **TOL)


DENSE_FLAG_CASES = [  # B, S, H, Hkv, Dh, C, lens, topk, block_size, budget, sink, window, flags
    (3, 1, 4, 2, 8, 64, [40, 10, 63], 3, 0, 0, 0, 0, [1, 0, 1]),  # exact decode
    (2, 5, 4, 2, 8, 64, [30, 50], 2, 0, 0, 2, 3, [0, 1]),  # exact, sinks + window, a verify-like chunk
    (2, 40, 2, 1, 16, 96, [0, 20], 4, 0, 0, 1, 4, [1, 1]),  # exact prefill, > one query chunk
    (3, 1, 4, 2, 8, 64, [40, 10, 63], 3, 8, 1, 0, 0, [0, 1, 1]),  # blocks decode
    (2, 6, 6, 2, 8, 96, [33, 70], 4, 8, 2, 8, 8, [1, 0]),  # blocks, sinks + window, mid-block chunk
]


@pytest.mark.parametrize("B,S,H,Hkv,Dh,C,lens,topk,bs,budget,sink,window,flags", DENSE_FLAG_CASES)
def test_dense_flag_kernel_body_and_reference_agree(B, S, H, Hkv, Dh, C, lens, topk, bs, budget, sink, window, flags):
    """attention_dense: flagged sequences get exact dense attention, the others exactly what
    they get without the input; the cache and the block summaries are written the same.
    The C++ kernel, the standard-op function body and the PyTorch reference agree."""
    rng = np.random.default_rng(B * 100 + S + sum(flags))
    q, k, v, past_k, past_v, lens = random_case(rng, B, S, H, Hkv, Dh, C, lens)
    flags = np.asarray(flags, np.int64)
    sums = [np.nan_to_num(x) for x in summaries(past_k, lens, bs)] if bs else []
    model = topk_attention_model(H, Hkv, Dh, topk, bs, budget, sink, window, with_function=True, attention_dense=True)
    want = reference(q, k, v, past_k, past_v, lens, H, Hkv, topk, bs, budget, sink, window, dense=flags)[0]
    dense = reference(q, k, v, past_k, past_v, lens, H, Hkv, 10 * C)[0]  # top-k beyond every key: dense
    sparse = reference(q, k, v, past_k, past_v, lens, H, Hkv, topk, bs, budget, sink, window)[0]
    on = flags != 0
    np.testing.assert_allclose(want[on], dense[on], **TOL)
    np.testing.assert_array_equal(want[~on], sparse[~on])
    assert np.abs(dense - sparse).max() > 1e-3  # the case tells dense from sparse apart
    unflagged = topk_attention_model(H, Hkv, Dh, topk, bs, budget, sink, window, with_function=True)
    for sess in (session(model), stock_session(model)):
        feeds = dict(
            query=q, key=k, value=v, past_key=past_k, past_value=past_v, past_lengths=lens, attention_dense=flags
        )
        if bs:
            feeds.update(past_key_min=sums[0], past_key_max=sums[1])
        got = sess.run(None, feeds)
        np.testing.assert_allclose(got[0], want, **TOL)
        plain = run_plugin(session(unflagged), q, k, v, past_k, past_v, lens, *sums)
        for a, b in zip(got[1:], plain[1:], strict=True):  # cache and summaries: as without the flag
            np.testing.assert_array_equal(a, b)
        # one flag for all sequences ([1]): the exported graphs' default is [0]
        feeds["attention_dense"] = np.array([0], np.int64)
        np.testing.assert_allclose(sess.run(None, feeds)[0], sparse, **TOL)


DENSE_PATH_CASES = [  # S, H, Hkv, Dh, C, lens, kv_dtype: the kernel's dense path (online softmax over key spans)
    (1, 4, 2, 64, 1408, [1300, 517], "fp32"),  # decode: 512-key spans, 64 output floats in registers
    (5, 4, 2, 64, 1408, [1024, 1], "fp16"),  # a verification: rows ending on a span boundary, a nearly empty cache
    (3, 4, 2, 72, 704, [600, 30], "fp32"),  # head size 64 + 8
    (2, 4, 2, 12, 608, [515, 7], "fp32"),  # head size not a multiple of 8 (portable path)
    (40, 4, 2, 16, 2208, [2100, 0], "fp16"),  # prefill: 2048-key spans, more queries than one chunk (96 / G)
    (40, 4, 2, 64, 2208, [2100, 0], "fp16"),  # prefill on AVX-512 (rows as lanes) where the CPU has it
    (35, 3, 1, 128, 400, [300, 5], "fp32"),  # ... head size 128, chunks of 32 and 3 queries (96 and 9 rows)
]


@pytest.mark.parametrize("S,H,Hkv,Dh,C,lens,kv_dtype", DENSE_PATH_CASES)
def test_dense_path_over_key_spans(S, H, Hkv, Dh, C, lens, kv_dtype):
    """Dense attention as the kernel computes it (keys split into spans, each span's softmax
    state merged in key order) equals the reference: for a dense export (top-k >= C) and for
    flagged sequences of a block graph. And a row's output does not depend on how many
    other rows share the call: a 5-row verification gives, row for row, what the same
    positions give decoded one at a time (bit for bit), as the lossless mode relies on."""
    B = 2
    rng = np.random.default_rng(S * 7 + Dh)
    case = half_case if kv_dtype == "fp16" else random_case
    q, k, v, past_k, past_v, lens = case(rng, B, S, H, Hkv, Dh, C, lens)
    want = reference(q, k, v, past_k, past_v, lens, H, Hkv, 10 * C)[0]  # top-k beyond every key: dense
    dense_export = session(topk_attention_model(H, Hkv, Dh, C, kv_dtype=kv_dtype))
    np.testing.assert_allclose(run_plugin(dense_export, q, k, v, past_k, past_v, lens)[0], want, **TOL)
    blocks = topk_attention_model(H, Hkv, Dh, 8, 16, 2, 4, 8, attention_dense=True, kv_dtype=kv_dtype)
    sums = half_summaries(past_k, lens, 16)  # float or half keys: bounds of the stored keys
    feeds = dict(query=q, key=k, value=v, past_key=past_k, past_value=past_v, past_lengths=lens)
    feeds.update(past_key_min=sums[0], past_key_max=sums[1], attention_dense=np.ones(B, np.int64))
    got = session(blocks).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, **TOL)
    if S <= 32:  # one position at a time, on the cache the earlier steps wrote
        sess, pk, pv = dense_export, past_k.copy(), past_v.copy()
        for s in range(S):
            one = run_plugin(sess, q[:, s : s + 1], k[:, s : s + 1], v[:, s : s + 1], pk, pv, lens + s)
            np.testing.assert_array_equal(one[0][:, 0], run_plugin(sess, q, k, v, past_k, past_v, lens)[0][:, s])
            pk, pv = one[1], one[2]


def test_dense_flag_of_a_wrong_length_is_a_clear_error():
    sess = session(topk_attention_model(2, 2, 8, 4, attention_dense=True))
    q, k, v, past_k, past_v, lens = random_case(np.random.default_rng(0), 2, 1, 2, 2, 8, 16, [3, 5])
    with pytest.raises(Exception, match="attention_dense must be"):
        sess.run(
            None,
            dict(
                query=q,
                key=k,
                value=v,
                past_key=past_k,
                past_value=past_v,
                past_lengths=lens,
                attention_dense=np.zeros(3, np.int64),
            ),
        )


def test_cache_overflow_is_a_clear_error():
    sess = session(topk_attention_model(2, 2, 8, 4))
    case = random_case(np.random.default_rng(0), 1, 4, 2, 2, 8, 8, [6])
    with pytest.raises(Exception, match="exceeds the cache capacity"):
        run_plugin(sess, *case)


def test_ragged_embedding_matches_reference():
    cfg = ModelConfig(
        vocab_size=50,
        d_model=24,
        n_layers=1,
        n_heads=2,
        n_kv_heads=2,
        d_ff=8,
        max_seq_len=8,
        embedding=EmbeddingConfig(kind="ragged", tier_sizes=(10, 15, 25), tier_widths=(24, 8, 4)),
    )
    emb = RaggedEmbedding(cfg)
    perm = torch.randperm(50).tolist()
    emb.set_tiers([perm[:10], perm[10:25], perm[25:]])
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        want = emb(ids).numpy()
    model = ragged_embedding_model(
        [t.detach().numpy() for t in emb.tables],
        [p.weight.detach().numpy() for p in emb.projs],
        emb.tier_of.numpy(),
        emb.row_of.numpy(),
    )
    got = session(model).run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, want, **TOL)


PAGED_CASES = [  # B, S, H, Hkv, Dh, C, lens, topk, block_size, budget, sink, window, page
    (2, 1, 4, 2, 16, 64, [40, 63], 8, 0, 0, 0, 0, 16),  # exact decode
    (3, 5, 3, 1, 8, 48, [10, 0, 31], 1000, 0, 0, 0, 0, 16),  # dense via exact: mixed lengths, chunked append
    (2, 70, 2, 2, 8, 128, [3, 50], 6, 0, 0, 2, 20, 32),  # exact prefill across pages, sinks + window
    (2, 6, 6, 2, 8, 96, [33, 70], 4, 8, 2, 8, 8, 8),  # blocks: one summary per page
    (1, 40, 4, 2, 16, 64, [0], 6, 8, 2, 3, 9, 16),  # blocks: two summaries per page, prefill from empty
]


def to_pages(cache, table, pool_pages, rows):
    """[B, Hkv, M*rows, Dh] -> a pool [N, Hkv, rows, Dh] holding sequence b's row block i in page table[b, i]."""
    B, Hkv, _, Dh = cache.shape
    pool = np.random.default_rng(0).standard_normal((pool_pages, Hkv, rows, Dh), dtype=np.float32)
    for b in range(B):
        for i, page in enumerate(table[b]):
            pool[page] = cache[b, :, i * rows : (i + 1) * rows]
    return pool


def from_pages(pool, table):
    return np.stack([np.concatenate([pool[p] for p in row], axis=1) for row in table])


@pytest.mark.parametrize("B,S,H,Hkv,Dh,C,lens,topk,bs,budget,sink,window,page", PAGED_CASES)
def test_paged_cache_kernel_and_body_equal_the_contiguous_layout(
    B, S, H, Hkv, Dh, C, lens, topk, bs, budget, sink, window, page
):
    """block_table (input 9): pages in shuffled order in a pool with spare pages; kernel and
    standard-op body give the contiguous layout's output, and write exactly the same rows and
    summaries in the pages (other pages untouched)."""
    rng = np.random.default_rng(B * 10 + S + page)
    q, k, v, past_k, past_v, lens = random_case(rng, B, S, H, Hkv, Dh, C, lens)
    sums = [np.nan_to_num(x) for x in summaries(past_k, lens, bs)] if bs else []
    M, N = C // page, B * (C // page) + 3
    table = rng.permutation(N)[: B * M].reshape(B, M).astype(np.int64)
    plain = topk_attention_model(H, Hkv, Dh, topk, bs, budget, sink, window, with_function=True)
    want = run_plugin(session(plain), q, k, v, past_k, past_v, lens, *sums)
    model = topk_attention_model(H, Hkv, Dh, topk, bs, budget, sink, window, with_function=True, paged=True)
    feeds = dict(
        query=q,
        key=k,
        value=v,
        past_key=to_pages(past_k, table, N, page),
        past_value=to_pages(past_v, table, N, page),
        past_lengths=lens,
        attention_dense=np.zeros(B, np.int64),
        block_table=table,
    )
    if bs:
        feeds.update(past_key_min=to_pages(sums[0], table, N, page // bs))
        feeds.update(past_key_max=to_pages(sums[1], table, N, page // bs))
    for sess in (session(model), stock_session(model)):
        got = sess.run(None, feeds)
        np.testing.assert_allclose(got[0], want[0], **TOL)
        spare = np.setdiff1d(np.arange(N), table)
        for i, (pool, contiguous) in enumerate(zip(got[1:], want[1:], strict=True)):
            before = feeds[["past_key", "past_value", "past_key_min", "past_key_max"][i]]
            np.testing.assert_array_equal(from_pages(pool, table), contiguous)
            np.testing.assert_array_equal(pool[spare], before[spare])  # pages of nobody: untouched


# --- float16 KV cache (export --kv-dtype fp16): queries, outputs and summaries stay float --
# The reference writes into a float16 cache (write_cache rounds the new rows) and attends to
# the stored rows widened to float, so kernel, function body and reference see the same keys:
# the stored cache must be bit-identical (round to nearest even everywhere), the summaries
# exact bounds of the stored keys, the outputs within TOL (float summation order).
FP16_CASES = [  # B, S, H, Hkv, Dh, C, lens, topk, block_size, budget, sink, window
    (1, 1, 4, 4, 16, 128, [100], 8, 0, 0, 0, 0),  # exact decode
    (2, 9, 4, 2, 12, 64, [7, 40], 5, 0, 0, 3, 0),  # exact prefill, sinks, Dh not a multiple of 8
    (2, 70, 2, 2, 8, 128, [3, 50], 6, 0, 0, 0, 20),  # exact, window, > one query chunk
    (1, 1, 4, 4, 16, 128, [100], 8, 8, 3, 0, 0),  # blocks decode
    (2, 1, 6, 2, 8, 96, [0, 95], 5, 16, 2, 5, 20),  # blocks: sink/window mid-block, GQA
    (3, 6, 3, 1, 8, 64, [9, 0, 33], 4, 4, 5, 2, 3),  # blocks: mixed lengths, blocks filled mid-call
    (2, 20, 2, 2, 8, 64, [3, 30], 1000, 8, 2, 4, 12),  # blocks, all keys of chosen blocks (Quest)
]


def half_case(rng, B, S, H, Hkv, Dh, C, lens):
    q, k, v, past_k, past_v, lens = random_case(rng, B, S, H, Hkv, Dh, C, lens)
    return q, k, v, past_k.astype(np.float16), past_v.astype(np.float16), lens


def half_summaries(keys16, lengths, bs):
    return [np.nan_to_num(x) for x in summaries(keys16.astype(np.float32), lengths, bs)] if bs else []


@pytest.mark.parametrize("B,S,H,Hkv,Dh,C,lens,topk,bs,budget,sink,window", FP16_CASES)
def test_fp16_cache_kernel_body_and_reference_agree(B, S, H, Hkv, Dh, C, lens, topk, bs, budget, sink, window):
    rng = np.random.default_rng(B * 1000 + S + 7 * sink + window + 3)
    q, k, v, past_k, past_v, lens = half_case(rng, B, S, H, Hkv, Dh, C, lens)
    sums = half_summaries(past_k, lens, bs)
    model = topk_attention_model(H, Hkv, Dh, topk, bs, budget, sink, window, with_function=True, kv_dtype="fp16")
    ref_out, ref_k, ref_v = reference(q, k, v, past_k, past_v, lens, H, Hkv, topk, bs, budget, sink, window)
    assert ref_k.dtype == np.float16
    for sess in (session(model), stock_session(model)):
        got = run_plugin(sess, q, k, v, past_k, past_v, lens, *sums)
        assert got[0].dtype == np.float32 and got[1].dtype == got[2].dtype == np.float16
        np.testing.assert_allclose(got[0], ref_out, **TOL)
        np.testing.assert_array_equal(got[1], ref_k)  # new rows rounded exactly as torch rounds
        np.testing.assert_array_equal(got[2], ref_v)
        if bs:  # float summaries: exact bounds of the stored (rounded) keys
            assert got[3].dtype == np.float32
            want_min, want_max = summaries(ref_k.astype(np.float32), lens + S, bs)
            written = ~np.isnan(want_min)
            np.testing.assert_array_equal(got[3][written], want_min[written])
            np.testing.assert_array_equal(got[4][written], want_max[written])


@pytest.mark.parametrize("bs,budget", [(0, 0), (8, 2)])
def test_fp16_cache_is_close_to_fp32_cache(bs, budget):
    """Same inputs through a float and a float16 cache: the outputs differ by the rounding of
    the cached rows only (|diff| <= 1e-2 with unit-variance keys/values; the selected keys
    are the same here, so no near tie is flipped)."""
    H, Hkv, Dh, C, topk = 4, 2, 16, 128, 8
    rng = np.random.default_rng(21)
    q, k, v, past_k, past_v, lens = random_case(rng, 2, 1, H, Hkv, Dh, C, [60, 120])
    past_k16, past_v16 = past_k.astype(np.float16), past_v.astype(np.float16)
    past_k, past_v = past_k16.astype(np.float32), past_v16.astype(np.float32)  # the same stored past
    f32 = session(topk_attention_model(H, Hkv, Dh, topk, bs, budget))
    f16 = session(topk_attention_model(H, Hkv, Dh, topk, bs, budget, kv_dtype="fp16"))
    out32 = run_plugin(f32, q, k, v, past_k, past_v, lens, *half_summaries(past_k16, lens, bs))
    out16 = run_plugin(f16, q, k, v, past_k16, past_v16, lens, *half_summaries(past_k16, lens, bs))
    np.testing.assert_allclose(out16[0], out32[0], atol=1e-2, rtol=0)
    np.testing.assert_array_equal(out16[1], out32[1].astype(np.float16))  # the stored rows: fp32 rounded


def test_fp16_cache_rounding_matches_numpy():
    """New rows are stored as numpy's float16 rounding (nearest even) for every kind of value:
    halfway ties, subnormals, overflow to inf, signed zero; both the vector body (8 lanes) and
    the scalar tail (Dh = 12)."""
    H, Hkv, Dh, C = 2, 2, 12, 16
    sess = session(topk_attention_model(H, Hkv, Dh, 4, kv_dtype="fp16"))
    specials = np.array(
        [1 + 2**-11, 1 + 3 * 2**-11, 2**-24, 2**-25, 3 * 2**-25, 1e-8, 65519.0, 65520.0, -0.0, -1.5, 7e4, 3.14159],
        np.float32,
    )
    rng = np.random.default_rng(4)
    k = np.tile(specials, (1, 3, Hkv))  # [1, 3, Hkv*Dh]
    k[0, 1] *= -1
    k[0, 2] = rng.standard_normal(Hkv * Dh).astype(np.float32) * 1e3
    q = rng.standard_normal((1, 3, H * Dh), dtype=np.float32) * 1e-3
    zeros = np.zeros((1, Hkv, C, Dh), np.float16)
    got = run_plugin(sess, q, k, k, zeros, zeros, np.array([0], np.int64))
    with np.errstate(over="ignore"):  # 7e4 -> inf, on purpose
        want = k.reshape(1, 3, Hkv, Dh).transpose(0, 2, 1, 3).astype(np.float16)
    np.testing.assert_array_equal(got[1][:, :, :3].view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(got[2][:, :, :3].view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("B,S,H,Hkv,Dh,C,lens,topk,bs,budget,sink,window,flags", DENSE_FLAG_CASES[::2])
def test_fp16_cache_dense_flag(B, S, H, Hkv, Dh, C, lens, topk, bs, budget, sink, window, flags):
    rng = np.random.default_rng(B * 100 + S + sum(flags) + 1)
    q, k, v, past_k, past_v, lens = half_case(rng, B, S, H, Hkv, Dh, C, lens)
    flags = np.asarray(flags, np.int64)
    sums = half_summaries(past_k, lens, bs)
    model = topk_attention_model(
        H, Hkv, Dh, topk, bs, budget, sink, window, with_function=True, attention_dense=True, kv_dtype="fp16"
    )
    want, ref_k, _ = reference(q, k, v, past_k, past_v, lens, H, Hkv, topk, bs, budget, sink, window, dense=flags)
    for sess in (session(model), stock_session(model)):
        feeds = dict(
            query=q, key=k, value=v, past_key=past_k, past_value=past_v, past_lengths=lens, attention_dense=flags
        )
        if bs:
            feeds.update(past_key_min=sums[0], past_key_max=sums[1])
        got = sess.run(None, feeds)
        np.testing.assert_allclose(got[0], want, **TOL)
        np.testing.assert_array_equal(got[1], ref_k)


def test_fp16_cache_in_place_incremental_decode_with_blocks():
    """Prefill then decode steps on one shared float16 cache (+ float summaries) bound as past
    and present: only new rows are written, the summaries stay exact bounds of the stored keys."""
    H, Hkv, Dh, C, topk, bs, budget = 4, 2, 8, 64, 5, 8, 2
    sess = session(topk_attention_model(H, Hkv, Dh, topk, bs, budget, kv_dtype="fp16"))
    rng = np.random.default_rng(12)
    bufs = {n: np.zeros((2, Hkv, C, Dh), np.float16) for n in ("past_key", "past_value")}
    bufs.update({n: np.zeros((2, Hkv, C // bs, Dh), np.float32) for n in ("past_key_min", "past_key_max")})
    vals = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in bufs.items()}
    ptrs = {n: val.data_ptr() for n, val in vals.items()}
    ref_k, ref_v = np.zeros_like(bufs["past_key"]), np.zeros_like(bufs["past_value"])
    lens = np.array([0, 3], np.int64)
    for S in (13, 1, 1, 4, 1):
        q, k, v, *_ = random_case(rng, 2, S, H, Hkv, Dh, 1, [0, 0])
        io = sess.io_binding()
        for name, arr in dict(query=q, key=k, value=v, past_lengths=lens).items():
            io.bind_cpu_input(name, arr)
        io.bind_output("output")
        for n, val in vals.items():
            io.bind_ortvalue_input(n, val)
            io.bind_ortvalue_output(n.replace("past", "present"), val)
        sess.run_with_iobinding(io)
        want, ref_k, ref_v = reference(q, k, v, ref_k, ref_v, lens, H, Hkv, topk, bs, budget)
        np.testing.assert_allclose(io.copy_outputs_to_cpu()[0], want, **TOL)
        lens = lens + S
    assert {n: val.data_ptr() for n, val in vals.items()} == ptrs
    np.testing.assert_array_equal(vals["past_key"].numpy(), ref_k)
    np.testing.assert_array_equal(vals["past_value"].numpy(), ref_v)
    lo, hi = summaries(ref_k.astype(np.float32), lens, bs)
    written = ~np.isnan(lo)
    np.testing.assert_array_equal(vals["past_key_min"].numpy()[written], lo[written])
    np.testing.assert_array_equal(vals["past_key_max"].numpy()[written], hi[written])


def test_fp16_cache_runs_the_kernel():
    """The float16 registration is the one onnxruntime picks (the kernel's own error message,
    not the function body's)."""
    sess = session(topk_attention_model(2, 2, 8, 4, kv_dtype="fp16"))
    q, k, v, past_k, past_v, lens = half_case(np.random.default_rng(0), 1, 4, 2, 2, 8, 8, [6])
    with pytest.raises(Exception, match="exceeds the cache capacity"):
        run_plugin(sess, q, k, v, past_k, past_v, lens)
