"""`python -m loadtests speculative` end to end on tiny exports: two real `ragtop serve`
processes, the rows it prints and writes (slow: it starts servers and exports models)."""

from __future__ import annotations

import json

import pytest
import torch

from loadtests.__main__ import main as loadtests_main
from ragtop.checkpoint import save_checkpoint
from ragtop.cli import main
from ragtop.convert.sparsify import with_attention
from ragtop.model import AttentionConfig, ModelConfig, Transformer
from ragtop.train.tokenizer import train_bpe

TEXTS = [
    "The committee reviewed the budget for the coming year.",
    "Farmers reported a good harvest this year.",
    "The secretary explained the new rules.",
    "Congress debated the treaty for many weeks.",
]


@pytest.mark.slow
def test_speculative_bench_rows(tmp_path):
    tok = train_bpe(TEXTS * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=128,
        attention=AttentionConfig("topk", topk=4, block_size=4, block_budget=2),
    )
    sparse = Transformer(cfg).eval()
    with torch.no_grad():
        for p in sparse.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    gen = {"bos_token_id": 0, "eos_token_id": 0}
    for name, model in (("sparse", sparse), ("dense", with_attention(sparse, AttentionConfig()))):
        ckpt = save_checkpoint(tmp_path / f"{name}-ckpt", model, tok.to_str(), generation=gen)
        assert main(["export", str(ckpt), str(tmp_path / name), "--no-validate"]) == 0
    out = tmp_path / "bench"
    assert (
        loadtests_main(
            [
                "speculative",
                "--model",
                str(tmp_path / "sparse"),
                "--dense",
                str(tmp_path / "dense"),
                "--contexts",
                "24,40",
                "--gammas",
                "3",
                "--new-tokens",
                "12",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "speculative.json").read_text())["rows"]
    assert [(r["context"], r["kind"]) for r in rows] == [
        (c, k) for c in (24, 40) for k in ("dense", "sparse", "speculative g=3")
    ]
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["vs_dense"] > 0
        if r["kind"] != "sparse":
            assert r["same_text_as_dense"], r  # lossless
        if r["kind"].startswith("speculative"):
            assert 0 <= r["acceptance"] <= 1
