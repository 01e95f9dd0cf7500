"""OrtRunner against TorchRunner on tiny exported models of every variant (needs the exporter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ragtop.checkpoint import save_checkpoint
from ragtop.cli import main
from ragtop.runtime import EngineConfig, Request, SamplingParams, SchedulerConfig, load_model
from ragtop.runtime.runners.base import Chunk

from .conftest import make_model

pytest.importorskip("ragtop.export.onnx", reason="the ONNX exporter has not landed")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", params=["dense", "topk", "topk-block", "ragged"])
def exported(request, tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    ckpt = save_checkpoint(
        root / "ckpt",
        make_model(tokenizer.get_vocab_size(), request.param),
        tokenizer.to_str(),
        generation={"bos_token_id": 0, "eos_token_id": 0},
    )
    assert main(["export", str(ckpt), str(root / "onnx"), "--no-validate"]) == 0
    return ckpt, root / "onnx"


def greedy_tokens(path: Path, prompts: list[list[int]], **sched) -> list[list[int]]:
    engine = load_model(path, threads=1).engine(EngineConfig(SchedulerConfig(**sched), context_limit=64))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    out = engine.run_until_done([Request(str(i), p, params) for i, p in enumerate(prompts)])
    return [[t for o in out[str(i)] for d in o.deltas for t in d.token_ids] for i in range(len(prompts))]


def test_ort_greedy_equals_torch_alone_and_batched(exported):
    ckpt, onnx_dir = exported
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 9, 17, 1, 30, 12, 5, 22)]
    want = greedy_tokens(ckpt, prompts[:3], max_batch_size=1)
    assert greedy_tokens(onnx_dir, prompts[:3], max_batch_size=1) == want
    batched = greedy_tokens(onnx_dir, prompts, max_batch_size=8, prefill_chunk=4, max_tokens_per_step=16)
    assert batched[:3] == want
    assert batched == greedy_tokens(ckpt, prompts, max_batch_size=8, prefill_chunk=4, max_tokens_per_step=16)


def test_ort_cache_is_written_in_place(exported):
    _, onnx_dir = exported
    runner = load_model(onnx_dir, threads=1).runner
    runner.allocate(4, 32)
    key = runner.buffers[0, "key"]
    ptr = key.ctypes.data
    logits = runner.forward([Chunk(2, [5, 6, 7], 0), Chunk(1, [9], 0, "none")])
    assert logits[0].shape == (300,) and logits[1] is None
    assert runner.buffers[0, "key"] is key and key.ctypes.data == ptr  # the same buffer, bound as past and present
    assert np.abs(key[2, :, :3]).sum() > 0 and np.abs(key[1, :, :1]).sum() > 0
    assert np.abs(key[2, :, 3:]).sum() == 0 and np.abs(key[0]).sum() == 0  # nothing else written
    runner.copy_slot(2, 3, 3)
    np.testing.assert_array_equal(key[3, :, :3], key[2, :, :3])


def test_generate_command_gives_the_same_text_with_either_runner(exported, capsys):
    ckpt, onnx_dir = exported
    texts = []
    for path in (ckpt, onnx_dir):
        assert main(["generate", str(path), "--prompt", "Hello world", "--max-tokens", "10", "--threads", "1"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert main(["generate", str(onnx_dir), "--runner", "torch", "--prompt", "x"]) == 2
    assert "--runner torch needs model.safetensors" in capsys.readouterr().err


def run_sequentially(engine, prompts, params):
    """Each request alone, one after another (a finished request's prefix stays cached)."""
    tokens, cached = [], []
    for i, p in enumerate(prompts):
        out = engine.run_until_done([Request(f"s{i}", p, params)])[f"s{i}"]
        tokens.append([t for o in out for d in o.deltas for t in d.token_ids])
        cached.append(out[-1].usage.cached_tokens)
    return tokens, cached


def test_prefix_cache_hits_give_the_same_greedy_tokens(exported):
    """A follow-up on the same document computes only what is new, and generates exactly what a
    full prefill gives: from a finished request's slot, and copied from a running one."""
    ckpt, onnx_dir = exported
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(1, 300, (36,), generator=g).tolist()
    prompts = [doc + [5, 6, 7], doc + [8, 9], doc[:20] + [10, 11], doc + [12, 13, 14, 15]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for path in (onnx_dir, ckpt):
        model = load_model(path, threads=1)
        cold = model.engine(EngineConfig(SchedulerConfig(max_batch_size=4), context_limit=64, prefix_caching=False))
        want, none_cached = run_sequentially(cold, prompts, params)
        cold.close()
        assert none_cached == [0, 0, 0, 0]
        model = load_model(path, threads=1)
        warm = model.engine(EngineConfig(SchedulerConfig(max_batch_size=4), context_limit=64))
        got, cached = run_sequentially(warm, prompts, params)
        assert got == want
        assert cached == [0, 32, 16, 32]  # whole blocks of 16, leaving >= 1 token to compute
        # a prefix held by a running sequence is copied into the new one's slot
        warm.add_request(Request("long", doc + [20, 21], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
        warm.step()
        warm.step()
        copies_before = len(warm.scheduler.running)
        warm.add_request(Request("follow", prompts[0], params))
        out: dict[str, list] = {}
        while warm.has_work():
            for o in warm.step():
                out.setdefault(o.request_id, []).append(o)
        assert copies_before == 1 and out["follow"][-1].usage.cached_tokens == 32
        assert [t for o in out["follow"] for d in o.deltas for t in d.token_ids] == want[0]
        warm.close()


def test_ort_runner_runs_int4_weights(tokenizer, tmp_path):
    """An --weights int4 export (MatMulNBits, fp32 compute) through OrtRunner gives the greedy
    tokens of the PyTorch model holding the same dequantized weights."""
    from ragtop.export.weights import plan, reference_model

    model = make_model(tokenizer.get_vocab_size(), "topk")
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model, tokenizer.to_str(), generation={"bos_token_id": 0, "eos_token_id": 0}
    )
    assert main(["export", str(ckpt), str(tmp_path / "onnx"), "--weights", "int4", "--no-validate"]) == 0
    ref = save_checkpoint(
        tmp_path / "ref",
        reference_model(model, plan(model, "int4", {})),
        tokenizer.to_str(),
        generation={"bos_token_id": 0, "eos_token_id": 0},
    )
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (4, 11, 19)]
    assert greedy_tokens(tmp_path / "onnx", prompts, max_batch_size=4) == greedy_tokens(ref, prompts, max_batch_size=4)
