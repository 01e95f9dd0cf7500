"""A float16 KV cache (`export --kv-dtype fp16`) through OrtRunner and the engine: the cache is
bound in place as float16 (block summaries float32), prefix-cache hits and speculative
decoding (rollback of the summaries) give exactly what the same export gives without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragtop.checkpoint import save_checkpoint
from ragtop.cli import main
from ragtop.runtime import EngineConfig, Request, SamplingParams, SchedulerConfig, load_model
from ragtop.runtime.runners.base import Chunk

from .conftest import make_model
from .test_ort_runner import run_sequentially
from .test_speculative_engine import CONTEXT, DenseEverywhere, generate, prompts, spec_counts

pytest.importorskip("onnxruntime")

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """fp16-cache exports of a block-selection and an exact top-k tiny model, and the block
    model's fp32-cache export."""
    out = {}
    for variant in ("topk-block", "topk"):
        root = tmp_path_factory.mktemp(f"kv16-{variant}")
        ckpt = save_checkpoint(
            root / "ckpt",
            make_model(tokenizer.get_vocab_size(), variant, max_seq_len=CONTEXT),
            tokenizer.to_str(),
            generation={"bos_token_id": 0, "eos_token_id": 0},
        )
        assert main(["export", str(ckpt), str(root / "onnx16"), "--no-validate", "--kv-dtype", "fp16"]) == 0
        out[variant] = root / "onnx16"
        if variant == "topk-block":
            assert main(["export", str(ckpt), str(root / "onnx32"), "--no-validate"]) == 0
            out["fp32"] = root / "onnx32"
    return out


def engine(path: Path, gamma: int = 0, dense: bool = False, prefix_caching: bool = True):
    model = load_model(path, threads=1)
    if dense:
        model.runner = DenseEverywhere(model.runner)
    config = SchedulerConfig(max_batch_size=4, prefill_chunk=16, max_tokens_per_step=64)
    eng = model.engine(
        EngineConfig(config, context_limit=CONTEXT, speculative_tokens=gamma, prefix_caching=prefix_caching)
    )
    eng.stats = []
    eng.stats_listeners.append(eng.stats.append)
    return eng


def test_cache_is_float16_in_place_and_half_the_bytes(exported):
    r16 = load_model(exported["topk-block"], threads=1).runner
    r32 = load_model(exported["fp32"], threads=1).runner
    # keys + values halve; the float32 summaries (2 vectors per block of 4) do not
    kv32 = 2 * r32.n_layers * r32.n_kv_heads * r32.head_dim * 4
    assert r32.spec.kv_bytes_per_token == kv32 + kv32 // 4
    assert r16.spec.kv_bytes_per_token == kv32 // 2 + kv32 // 4
    r16.allocate(4, 32)
    key, kmin = r16.buffers[0, "key"], r16.buffers[0, "key_min"]
    assert key.dtype == np.float16 and kmin.dtype == np.float32
    ptr = key.ctypes.data
    r16.forward([Chunk(2, [5, 6, 7], 0), Chunk(1, [9], 0, "none")])
    assert r16.buffers[0, "key"] is key and key.ctypes.data == ptr
    assert np.abs(key[2, :, :3]).sum() > 0 and np.abs(key[2, :, 3:]).sum() == 0 and np.abs(key[0]).sum() == 0
    # the summaries bound the stored float16 keys exactly
    np.testing.assert_array_equal(kmin[2, :, 0], key[2, :, :3].astype(np.float32).min(axis=1))


def test_fp16_cache_greedy_equals_fp32_cache_on_the_tiny_model(exported):
    """Rounding the cache to float16 moves the tiny model's logits by ~1e-3: its greedy tokens
    (sharp logits, no near ties) stay those of the float32 cache."""
    requests = [Request(str(i), p, GREEDY) for i, p in enumerate(prompts())]
    assert generate(engine(exported["topk-block"]), requests) == generate(engine(exported["fp32"]), requests)


@pytest.mark.parametrize("variant", ["topk-block", "topk"])
def test_prefix_cache_hits_give_the_same_greedy_tokens(exported, variant):
    doc = prompts(1, seed=2)[0] + prompts(1, seed=4)[0][:8]  # 48 tokens
    ps = [doc + [5, 6, 7], doc + [8, 9], doc[:20] + [10, 11], doc + [12, 13, 14, 15]]
    want, none_cached = run_sequentially(engine(exported[variant], prefix_caching=False), ps, GREEDY)
    got, cached = run_sequentially(engine(exported[variant]), ps, GREEDY)
    assert none_cached == [0, 0, 0, 0] and max(cached) > 0
    assert got == want


@pytest.mark.parametrize("variant", ["topk-block", "topk"])
def test_speculative_output_is_dense_with_a_float16_cache(exported, variant):
    """Sparse drafts, dense verification, rejected drafts rolled back (block summaries rebuilt
    from the stored float16 keys): exactly the dense model's tokens on the same cache type."""
    path = exported[variant]
    requests = [Request(str(i), p, GREEDY) for i, p in enumerate(prompts())]
    want = generate(engine(path, dense=True), requests)
    eng = engine(path, gamma=4)
    assert generate(eng, requests) == want
    drafted, accepted = spec_counts(eng)
    assert drafted > accepted  # some drafts were rejected: the rollback ran
