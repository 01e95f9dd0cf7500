"""Training-free conversions on tiny random models: top-k attention, SVD-ragged embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from ragtop.checkpoint import load_checkpoint, save_checkpoint
from ragtop.cli import main
from ragtop.convert import commands
from ragtop.convert.sparsify import (
    frequency_tiers,
    parse_tiers,
    svd_compress,
    to_ragged,
    topk_attention,
    with_attention,
)
from ragtop.errors import RagtopError
from ragtop.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=32)


def model() -> Transformer:
    return Transformer(CFG).eval()


def test_parse_and_resolve_tiers():
    spec = parse_tiers("16:24, 32:12, *:4")
    assert spec.sizes == (16, 32, None) and spec.widths == (24, 12, 4)
    assert spec.resolve(64, 24) == ((16, 32, 16), (16, 12, 4))  # a width is capped at its tier size
    assert str(spec) == "16:24,32:12,*:4"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("16-24", "expected SIZE:WIDTH"),
        ("*:8,16:4", "only the last tier may be"),
        ("0:8,*:4", "must be >= 1"),
        ("", "empty tier spec"),
    ],
)
def test_bad_tier_specs(spec, message):
    with pytest.raises(RagtopError, match=message):
        parse_tiers(spec)


@pytest.mark.parametrize(
    "spec,message",
    [("16:8,16:4", "does not cover"), ("80:8,*:4", "does not cover"), ("16:48,*:4", "exceeds the model width")],
)
def test_tiers_that_do_not_fit(spec, message):
    with pytest.raises(RagtopError, match=message):
        parse_tiers(spec).resolve(64, 24)


def test_frequency_tiers_order():
    counts = np.array([0, 5, 5, 9, 0, 1])
    assert frequency_tiers(counts, [2, 2, 2]) == [[3, 1], [2, 5], [0, 4]]  # ties: lower id first


def test_svd_compress_is_exact_at_full_rank_and_best_below():
    rows = torch.randn(10, 6)
    table, proj = svd_compress(rows, 6)
    assert table.shape == (10, 6) and proj.shape == (6, 6)
    assert_close(table @ proj.t(), rows, atol=1e-5, rtol=1e-5)
    errors = [torch.linalg.norm(rows - (t @ p.t())) for t, p in (svd_compress(rows, w) for w in (1, 3, 5))]
    assert errors[0] > errors[1] > errors[2]


@torch.no_grad()
def test_full_width_ragged_reproduces_dense_logits():
    dense = model()
    tiers = frequency_tiers(np.random.default_rng(0).integers(0, 100, 64), [8, 24, 32])
    ragged = to_ragged(dense, tiers, [24, 24, 24])
    assert ragged.embed.tiers() == tiers
    ids = torch.randint(0, 64, (2, 16))
    assert_close(ragged(ids), dense(ids), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_narrow_tiers_only_change_their_own_tokens_rows():
    dense = model()
    ragged = to_ragged(dense, [list(range(32)), list(range(32, 64))], [24, 4])
    assert_close(ragged.embed(torch.arange(32)[None]), dense.embed(torch.arange(32)[None]), atol=1e-5, rtol=1e-5)
    assert ragged.parameter_counts()["embedding"] == 32 * 24 + 24 * 24 + 32 * 4 + 4 * 24


@torch.no_grad()
def test_topk_covering_every_key_equals_dense():
    dense = model()
    sparse = with_attention(dense, topk_attention(32))
    ids = torch.randint(0, 64, (2, 20))
    assert_close(sparse(ids), dense(ids))
    assert sparse.config.attention.topk == 32


def test_bad_topk_options():
    with pytest.raises(RagtopError, match="block_size and block_budget"):
        topk_attention(8, block_size=16)


def test_cli_convert_ragged(tmp_path, monkeypatch, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i for i in range(26)} | {f"<{i}>": 26 + i for i in range(38)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    src = save_checkpoint(tmp_path / "dense", model(), tok.to_str())
    monkeypatch.setattr(commands, "training_texts", lambda data_dir: ["aaaabbbccd"] * 3)
    out = tmp_path / "ragged"
    assert main(["convert", str(src), "--out", str(out), "--embedding", "ragged", "--tiers", "4:24,*:8"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.config.embedding.tier_sizes == (4, 60)
    assert ckpt.model.embed.tiers()[0] == [0, 1, 2, 3]  # a, b, c, d: the most frequent
    assert main(["convert", str(src), "--out", str(out), "--embedding", "ragged", "--tiers", "4:24,8:8"]) == 2
    assert "does not cover the vocabulary" in capsys.readouterr().err
    assert main(["convert", str(src), "--out", str(out)]) == 2
    assert "nothing to convert" in capsys.readouterr().err


def test_cli_convert_sinks_window_dense_layers(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(64)}, unk_token="<0>"))
    src = save_checkpoint(tmp_path / "dense", model(), tok.to_str())
    out = tmp_path / "sparse"
    assert (
        main(
            [
                "convert",
                str(src),
                "--out",
                str(out),
                "--attention",
                "topk",
                "--topk",
                "8",
                "--block-size",
                "4",
                "--block-budget",
                "2",
                "--sink-tokens",
                "4",
                "--local-window",
                "16",
                "--dense-layers",
                "1",
            ]
        )
        == 0
    )
    a = load_checkpoint(out).config.attention
    assert (a.topk, a.block_size, a.block_budget, a.sink_tokens, a.local_window, a.dense_layers) == (8, 4, 2, 4, 16, 1)
    assert main(["convert", str(src), "--out", str(out), "--local-window", "16"]) == 2
    assert "need --attention topk" in capsys.readouterr().err
    # a block budget per layer (the model has 2 layers)
    base = ["convert", str(src), "--out", str(out), "--attention", "topk", "--block-size", "4", "--topk", "16"]
    assert main([*base, "--layer-budgets", "1,3"]) == 0
    a = load_checkpoint(out).config.attention
    assert (a.layer_budgets, a.block_budget) == ((1, 3), 3)
    assert main([*base, "--layer-budgets", "1,3,2"]) == 2
    assert "3 entries for 2 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--layer-budgets", "1,0"])
    assert "every layer budget must be an integer >= 1" in capsys.readouterr().err
