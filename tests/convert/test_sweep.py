"""The quality sweep on a tiny random model (no corpus, no SmolLM2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from ragtop.checkpoint import load_checkpoint, save_checkpoint
from ragtop.convert.sweep import default_variants, markdown_table, run_sweep
from ragtop.model import ModelConfig, Transformer


def letter_model(tmp_path, n_layers: int):
    """A tiny random model over a letter-level tokenizer (no corpus, no SmolLM2)."""
    vocab = {chr(ord("a") + i): i for i in range(26)} | {" ": 26, "<sep>": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    cfg = ModelConfig(vocab_size=28, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=64)
    return load_checkpoint(
        save_checkpoint(tmp_path / "c", Transformer(cfg), tok.to_str(), generation={"document_separator_id": 27})
    )


def test_sweep_rows_and_table(tmp_path):
    ckpt = letter_model(tmp_path, n_layers=1)
    docs = [("one", "the quick brown fox jumps over the lazy dog " * 2), ("two", "a short one")]
    variants = default_variants(topks=(4, 64), tier_specs=("8:16,*:4",), combined=((4, "8:16,*:4"),))
    assert [v.name for v in variants] == [
        "dense",
        "top-4",
        "dense + ragged 8:16,*:4",
        "top-4 + ragged 8:16,*:4",
        "top-64",
    ]
    counts = np.arange(28)[::-1].copy()
    out = tmp_path / "rows.jsonl"
    rows = run_sweep(
        ckpt,
        variants,
        docs,
        counts,
        long_tokens=40,
        long_passages=2,
        short_tokens=8,
        short_passages=2,
        out=out,
        log=lambda s: None,
    )
    assert [json.loads(line)["variant"] for line in out.read_text().splitlines()] == [v.name for v in variants]
    dense, top64 = rows[0], rows[-1]
    assert dense["long"]["tokens"] == 40 and dense["short"]["tokens"] == 16  # "two" is too short for the long set
    # k >= context keeps every key: dense up to float summation order (random init, no seed)
    assert top64["long"]["tokens"] == dense["long"]["tokens"]
    assert top64["long"]["perplexity"] == pytest.approx(dense["long"]["perplexity"], rel=1e-5)
    assert rows[2]["embedding_params"] == 8 * 8 + 16 * 8 + 20 * 4 + 16 * 4  # width 16 capped at 8 rows
    table = markdown_table(rows).splitlines()
    assert table[2].startswith("| dense | ") and "+0.00%" in table[2]
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| dense",
        "| top-4",
        "| top-64",
        "| dense + ragged 8:16,*:4",
        "| top-4 + ragged 8:16,*:4",
    ]


def test_parse_setting_and_kv_read():
    import pytest

    from ragtop.convert.sweep import SparseSetting, kv_read_fraction, parse_setting
    from ragtop.errors import RagtopError
    from ragtop.model import AttentionConfig

    s = parse_setting("k=all,bs=32,budget=16,sink=32,window=256,dense=2")
    assert s == SparseSetting(None, 32, 16, 32, 256, 2) and s.name == "all bs32x16 sink32 win256 dense2"
    assert s.attention().topk == 17 * 32  # every key of the chosen blocks
    with pytest.raises(RagtopError, match="k=all needs blocks"):
        parse_setting("k=all")
    with pytest.raises(RagtopError, match="bad setting item"):
        parse_setting("q=3")
    assert kv_read_fraction(AttentionConfig(), 30, 8192) == 1.0
    # exact top-k: every key scored, k values read
    assert kv_read_fraction(AttentionConfig("topk", topk=256), 1, 8192) == (8192 + 256) / (2 * 8192)
    # blocks: 255 earlier blocks' min/max, 16 chosen + own block's keys (32 each), 256 values
    blocks = AttentionConfig("topk", topk=256, block_size=32, block_budget=16)
    assert kv_read_fraction(blocks, 1, 8192) == (2 * 255 + 17 * 32 + 256) / (2 * 8192)
    # dense first layers count whole
    half = AttentionConfig("topk", topk=256, block_size=32, block_budget=16, dense_layers=1)
    assert kv_read_fraction(half, 2, 8192) == (kv_read_fraction(blocks, 1, 8192) + 1) / 2
    # a window covering everything reads at least everything
    assert kv_read_fraction(AttentionConfig("topk", topk=8, local_window=64), 1, 64) >= 1.0
    # a budget per layer: the mean of the layers' reads; "budgets=" in a setting
    per_layer = parse_setting("k=all,bs=32,budgets=4/28,sink=32,window=256")
    assert per_layer.name == "all bs32x16/layer sink32 win256"
    a = per_layer.attention()
    assert a.layer_budgets == (4, 28) and a.block_budget == 28 and a.topk == 29 * 32
    one = [parse_setting(f"k=all,bs=32,budget={b},sink=32,window=256").attention() for b in (4, 28)]
    assert kv_read_fraction(a, 2, 8192) == (kv_read_fraction(one[0], 1, 8192) + kv_read_fraction(one[1], 1, 8192)) / 2
    with pytest.raises(RagtopError, match="not both"):
        parse_setting("k=all,bs=32,budget=4,budgets=4/28")
    with pytest.raises(RagtopError, match="bad value"):
        parse_setting("k=all,bs=32,budgets=4/x")


def test_calibration_rows_and_table(tmp_path):
    from ragtop.convert.sweep import calibration_table, parse_setting, run_calibration

    ckpt = letter_model(tmp_path, n_layers=2)
    docs = [
        ("one", "the quick brown fox jumps over the lazy dog " * 2),
        ("two", "pack my box with five dozen liquor jugs " * 2),
    ]
    settings = [None, parse_setting("k=2,bs=4,budget=1,sink=2,window=4"), parse_setting("k=all,bs=4,budget=16")]
    out = tmp_path / "rows.jsonl"
    rows = run_calibration(ckpt, settings, docs, lengths=(16, 40), passages=2, out=out, log=lambda s: None)
    assert [json.loads(line)["setting"] for line in out.read_text().splitlines()] == [
        "dense",
        "k2 bs4x1 sink2 win4",
        "all bs4x16",
    ]
    dense, sparse, everything = rows
    assert dense["lengths"]["40"]["tokens"] == 80 and dense["lengths"]["40"]["kv_read"] == 1.0
    assert sparse["lengths"]["40"]["kv_read"] < 1.0
    assert (
        abs(everything["lengths"]["40"]["perplexity"] / dense["lengths"]["40"]["perplexity"] - 1) < 1e-5
    )  # budget covers all
    assert sparse["lengths"]["40"]["perplexity"] != dense["lengths"]["40"]["perplexity"]
    table = calibration_table(rows).splitlines()
    assert table[0].startswith("| setting | 16: ppl | Δ ppl | KV read | 40: ppl")
    assert table[2].startswith("| dense | ") and "+0.00%" in table[2]
