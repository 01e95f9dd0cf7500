"""OrtRunner against TorchRunner on tiny exported models of every variant (needs the exporter)."""

from __future__ import annotations

from pathlib import Path

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
    ckpt = save_checkpoint(root / "ckpt", make_model(tokenizer.get_vocab_size(), request.param), tokenizer.to_str(),
                           generation={"bos_token_id": 0, "eos_token_id": 0})
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
    ptr = key.data_ptr()
    logits = runner.forward([Chunk(2, [5, 6, 7], 0), Chunk(1, [9], 0, "none")])
    assert logits[0].shape == (300,) and logits[1] is None
    assert key.data_ptr() == ptr  # the same buffer, bound as past and present
    assert key[2, :, :3].abs().sum() > 0 and key[1, :, :1].abs().sum() > 0
    assert key[2, :, 3:].abs().sum() == 0 and key[0].abs().sum() == 0  # nothing else written
    runner.copy_slot(2, 3, 3)
    torch.testing.assert_close(key[3, :, :3], key[2, :, :3])


def test_generate_command_gives_the_same_text_with_either_runner(exported, capsys):
    ckpt, onnx_dir = exported
    texts = []
    for path in (ckpt, onnx_dir):
        assert main(["generate", str(path), "--prompt", "Hello world", "--max-tokens", "10", "--threads", "1"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert main(["generate", str(onnx_dir), "--runner", "torch", "--prompt", "x"]) == 2
    assert "--runner torch needs model.safetensors" in capsys.readouterr().err


def test_ort_runner_runs_int4_weights(tokenizer, tmp_path):
    """An --weights int4 export (MatMulNBits, fp32 compute) through OrtRunner gives the greedy
    tokens of the PyTorch model holding the same dequantized weights."""
    from ragtop.export.weights import plan, reference_model

    model = make_model(tokenizer.get_vocab_size(), "topk")
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer.to_str(), generation={"bos_token_id": 0, "eos_token_id": 0})
    assert main(["export", str(ckpt), str(tmp_path / "onnx"), "--weights", "int4", "--no-validate"]) == 0
    ref = save_checkpoint(tmp_path / "ref", reference_model(model, plan(model, "int4", {})), tokenizer.to_str(),
                          generation={"bos_token_id": 0, "eos_token_id": 0})
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (4, 11, 19)]
    assert greedy_tokens(tmp_path / "onnx", prompts, max_batch_size=4) == greedy_tokens(ref, prompts, max_batch_size=4)
