"""The quality sweep on a tiny random model (no corpus, no SmolLM2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from ragtop.checkpoint import load_checkpoint, save_checkpoint
from ragtop.convert.sweep import default_variants, markdown_table, run_sweep
from ragtop.model import ModelConfig, Transformer


def test_sweep_rows_and_table(tmp_path):
    vocab = {chr(ord("a") + i): i for i in range(26)} | {" ": 26, "<sep>": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    cfg = ModelConfig(vocab_size=28, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=64)
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "c", Transformer(cfg), tok.to_str(),
                                           generation={"document_separator_id": 27}))
    docs = [("one", "the quick brown fox jumps over the lazy dog " * 2), ("two", "a short one")]
    variants = default_variants(topks=(4, 64), tier_specs=("8:16,*:4",), combined=((4, "8:16,*:4"),))
    assert [v.name for v in variants] == ["dense", "top-4", "dense + ragged 8:16,*:4", "top-4 + ragged 8:16,*:4", "top-64"]
    counts = np.arange(28)[::-1].copy()
    out = tmp_path / "rows.jsonl"
    rows = run_sweep(ckpt, variants, docs, counts, long_tokens=40, long_passages=2, short_tokens=8,
                     short_passages=2, out=out, log=lambda s: None)
    assert [json.loads(line)["variant"] for line in out.read_text().splitlines()] == [v.name for v in variants]
    dense, top64 = rows[0], rows[-1]
    assert dense["long"]["tokens"] == 40 and dense["short"]["tokens"] == 16  # "two" is too short for the long set
    # k >= context keeps every key: dense up to float summation order (random init, no seed)
    assert top64["long"]["tokens"] == dense["long"]["tokens"]
    assert top64["long"]["perplexity"] == pytest.approx(dense["long"]["perplexity"], rel=1e-5)
    assert rows[2]["embedding_params"] == 8 * 8 + 16 * 8 + 20 * 4 + 16 * 4  # width 16 capped at 8 rows
    table = markdown_table(rows).splitlines()
    assert table[2].startswith("| dense | ") and "+0.00%" in table[2]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| dense", "| top-4", "| top-64", "| dense + ragged 8:16,*:4", "| top-4 + ragged 8:16,*:4"]
