"""The onnx runner of `ragtop sweep` / `ragtop bench retrieval`: one block export, its
TopKAttention attributes rewritten per setting, must compute what a fresh export of that
setting computes (and the PyTorch reference), on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ragtop.checkpoint import save_checkpoint
from ragtop.cli import main
from ragtop.model import AttentionConfig, ModelConfig, Transformer

pytest.importorskip("onnxruntime")
pytest.importorskip("ragtop.export.onnx")

from ragtop.bench.onnx_sweep import (  # noqa: E402
    OnnxEvaluator,
    allocate,
    greedy_onnx,
    restore,
    run_calibration_onnx,
    score_positions,
    snapshot,
)
from ragtop.convert.sweep import Passage, parse_setting  # noqa: E402
from ragtop.runtime.plugin import plugin_library_path  # noqa: E402

if plugin_library_path() is None:
    pytest.skip("the ragtop onnxruntime plugin is not built (make install)", allow_module_level=True)

VOCAB, CONTEXT = 64, 128
EXPORTED = AttentionConfig("topk", topk=12, block_size=4, block_budget=2, sink_tokens=2, local_window=3, dense_layers=1)
# other block sizes, budgets, sinks, windows, dense layers and top-k within blocks than EXPORTED
SETTINGS = [
    "k=all,bs=8,budget=3,sink=8,window=16,dense=2",
    "k=5,bs=4,budget=4,sink=0,window=0",
    "k=all,bs=16,budget=1,sink=16,window=8,dense=0",
    "k=7",  # exact top-k: every block a candidate
    "k=all,bs=4,budgets=1/5/2,sink=2,window=3",  # a block budget per layer
]


def tiny(attention: AttentionConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=CONTEXT)
    model = Transformer(cfg.with_attention(attention)).eval()
    with torch.no_grad():  # sharper attention than the init's, so selection matters
        for p in model.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
    return model


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    tok.train_from_iterator(["the union is strong and the people are free"] * 8, trainer)
    return tok.to_str()


def export(root: Path, attention: AttentionConfig, tokenizer_json: str) -> Path:
    ckpt = save_checkpoint(
        root / "ckpt", tiny(attention), tokenizer_json, generation={"bos_token_id": 0, "eos_token_id": 0}
    )
    assert main(["export", str(ckpt), str(root / "onnx"), "--no-validate"]) == 0
    return root / "onnx"


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory, tokenizer_json) -> OnnxEvaluator:
    return OnnxEvaluator(export(tmp_path_factory.mktemp("sweep"), EXPORTED, tokenizer_json), threads=1)


def ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_nll(attention: AttentionConfig, x: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = tiny(attention)(torch.tensor([x[:-1]]))[0]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(x[1:]), reduction="none").double().numpy()


@pytest.mark.parametrize("spec", SETTINGS)
def test_rewritten_graph_equals_a_fresh_export_and_the_reference(evaluator, spec, tmp_path, tokenizer_json):
    a = parse_setting(spec).attention()
    x = ids(CONTEXT + 1)
    r = evaluator.runner(a)
    allocate(r, CONTEXT)
    got = score_positions(r, x[:-1], x[1:], chunk=24)  # chunks not aligned to blocks
    fresh_export = a if a.block_size else AttentionConfig("topk", topk=a.topk, block_size=4, block_budget=CONTEXT // 4)
    # (per-layer budgets: the fresh export carries them as node attributes, one per layer)
    fresh = OnnxEvaluator(export(tmp_path, fresh_export, tokenizer_json), threads=1)
    f = fresh.runner(fresh_export)
    allocate(f, CONTEXT)
    want = score_positions(f, x[:-1], x[1:], chunk=CONTEXT)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, reference_nll(a, x), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, reference_nll(AttentionConfig(), x), rtol=1e-3, atol=1e-3)  # it is sparse


def test_dense_is_the_dense_model(evaluator):
    x = ids(CONTEXT + 1, seed=2)
    r = evaluator.runner(AttentionConfig())
    allocate(r, CONTEXT)
    np.testing.assert_allclose(
        score_positions(r, x[:-1], x[1:], chunk=40), reference_nll(AttentionConfig(), x), rtol=1e-4, atol=1e-4
    )


def test_restored_dense_prefill_equals_running_it(evaluator):
    """A snapshot of the dense prefill's keys/values, restored under another block size (its
    summaries recomputed), scores the sparse tail as a dense prefill in the same session does."""
    a = parse_setting("k=all,bs=8,budget=2,sink=8,window=8,dense=1").attention()
    x, tail = ids(CONTEXT + 1, seed=3), 32
    dense = evaluator.runner(AttentionConfig())
    allocate(dense, CONTEXT)
    score_positions(dense, x[:-1], x[1:], chunk=CONTEXT, dense_until=CONTEXT)
    snap = snapshot(dense, CONTEXT - tail)
    r = evaluator.runner(a)
    allocate(r, CONTEXT)
    direct = score_positions(r, x[:-1], x[1:], chunk=48, dense_until=CONTEXT - tail)[-tail:]
    allocate(r, CONTEXT)
    restore(r, snap, CONTEXT - tail)
    restored = score_positions(r, x[:-1], x[1:], chunk=tail, start=CONTEXT - tail)
    np.testing.assert_allclose(restored, direct, rtol=1e-5, atol=1e-5)
    sparse = score_positions((allocate(r, CONTEXT), r)[1], x[:-1], x[1:])[-tail:]
    assert not np.allclose(restored, sparse, rtol=1e-4, atol=1e-4)  # the prefill mattered


def test_calibration_rows_and_greedy(evaluator):
    n, tail = 64, 16
    x = torch.tensor(ids(n + 1, seed=4))
    sets = {n: [Passage(x, 100, "a")]}
    setting = parse_setting("k=all,bs=8,budget=1,sink=8,window=8")
    rows = run_calibration_onnx(evaluator, [None, setting], sets, tail=tail, chunk=16, log=lambda m: None)
    dense, sparse = (r["lengths"][str(n)] for r in rows)
    want = np.exp(reference_nll(AttentionConfig(), x.tolist()).mean())
    assert dense["perplexity"] == pytest.approx(want, rel=1e-4)
    assert sparse["perplexity"] == pytest.approx(
        np.exp(reference_nll(setting.attention(), x.tolist()).mean()), rel=1e-4
    )
    assert dense["tail"]["sparse"] == dense["tail"]["dense"] == dense["tail"]["dense_prefill"]
    assert sparse["tail"]["dense"] == pytest.approx(np.exp(reference_nll(AttentionConfig(), x.tolist())[-tail:].mean()))
    again = run_calibration_onnx(evaluator, [None, setting], sets, tail=tail, chunk=16, log=lambda m: None)
    assert [r["lengths"] for r in again] == [r["lengths"] for r in rows]  # the dense run read from its cache
    (only,) = run_calibration_onnx(evaluator, [setting], sets, tail=0, chunk=16, log=lambda m: None)
    assert only["lengths"][str(n)] == {k: v for k, v in sparse.items() if k != "tail"}  # no dense run needed
    r = evaluator.runner(setting.attention())
    out = greedy_onnx(r, x[:40].tolist(), 5)
    with torch.no_grad():
        from ragtop.bench.retrieval import greedy

        assert out == greedy(tiny(setting.attention()), x[:40].tolist(), 5)


def test_layer_budgets_are_per_layer(evaluator):
    """Budgets (1, 5, 2) score as no single budget does, and equal budgets as one budget."""
    x = ids(CONTEXT + 1, seed=4)

    def nll(spec: str) -> np.ndarray:
        r = evaluator.runner(parse_setting(spec).attention())
        allocate(r, CONTEXT)
        return score_positions(r, x[:-1], x[1:], chunk=32)

    np.testing.assert_allclose(nll("k=all,bs=4,budgets=3/3/3"), nll("k=all,bs=4,budget=3"), rtol=1e-6, atol=1e-6)
    mixed = nll("k=all,bs=4,budgets=1/5/2")
    for b in (1, 2, 5):
        assert not np.allclose(mixed, nll(f"k=all,bs=4,budget={b}"), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="2 layer budgets for a model of 3 layers"):
        evaluator.runner(parse_setting("k=all,bs=4,budgets=1/5").attention())
