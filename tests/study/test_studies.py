"""Tiny versions of each study: report structure, matched parameters, held-out != train."""

import json
import math

import pytest
import torch

from ragtop.cli import main
from ragtop.model import AttentionConfig, ModelConfig
from ragtop.model.attention import AttnContext, TopKAttention
from ragtop.study.analyze import analyze, check_claims, decode_bytes, prefill_flops
from ragtop.study.attention import run_attention_study
from ragtop.study.embeddings import ARMS, MATCH_TOLERANCE, run_embedding_study
from ragtop.study.kernels import block_summaries, block_topk_decode, dense_decode, topk_decode
from ragtop.study.report import render
from ragtop.study.runs import Budget

TINY = Budget(steps=6, batch_size=4, context=32, warmup=2)


@pytest.fixture(scope="module")
def emb_report(data_dir):
    torch.set_num_threads(1)
    return run_embedding_study(data_dir, ["v64-d32"], [1000, 3000], [0, 1], TINY, score_tokens=256, log=lambda s: None)


def test_embedding_report_structure_and_matching(emb_report):
    rows = emb_report["setups"]["v64-d32"]["rows"]
    assert [r["corpus_tokens"] for r in rows] == [1000, 3000]
    assert emb_report["complete"]
    for row in rows:
        assert set(row["arms"]) == set(ARMS)
        std, body, total = (row["arms"][a]["params"] for a in ARMS)
        assert body["non_embedding"] == std["non_embedding"]  # same body
        assert body["embedding"] != std["embedding"]
        assert abs(total["total"] - std["total"]) <= MATCH_TOLERANCE * std["total"]  # same total, within 1%
        for a in row["arms"].values():
            assert a["heldout_loss"]["n"] == 2 and len(a["runs"]) == 2
            assert all(math.isfinite(r["heldout_loss"]) and math.isfinite(r["train_loss"]) for r in a["runs"])
            assert all(r["train_tokens"] == TINY.tokens for r in a["runs"])  # same training tokens
            assert "state_dict" not in a["runs"][0]
        assert sum(row["tiers"]["sizes"]) == 64
    json.dumps(emb_report)  # JSON-able


def test_attention_report_matches_parameters(data_dir):
    torch.set_num_threads(1)
    rep = run_attention_study(
        data_dir,
        "v512-d32",
        [2, 4],
        [0],
        Budget(4, 2, 32, warmup=1),
        score_tokens=128,
        corpus_tokens=5000,
        log=lambda s: None,
    )
    assert rep["params_match"]
    assert set(rep["arms"]) == {"dense", "topk2", "topk4", "topk4-block16x2", "dense->topk2", "dense->topk4"}
    counts = {a["params"]["total"] for a in rep["arms"].values()}
    assert len(counts) == 1
    for a in rep["arms"].values():
        assert math.isfinite(a["heldout_loss"]["mean"]) and a["heldout_ppl"]["mean"] > 1
    json.dumps(rep)


def test_claim_formulas_reproduce_the_summary_dense_figures():
    c = check_claims()
    for f in c["flops"]:  # the summary's dense FLOPs are 2·T²·d
        assert round(f["2T2d"] / 1e5) == round(f["claimed_dense"] / 1e5)  # printed as 0.1M
        assert f["ratio_dense_vs_topk_exact"] < 2.0  # exact top-k scores every key
    for m in c["memory"]:  # T²·H·4 with H = d/8, and T·32·H·4
        assert m["T2_H_4_with_H_d_over_8"] == pytest.approx(m["claimed_dense"], rel=0.01)
        assert m["T_k_H_4_with_k32"] == pytest.approx(m["claimed_sparse"], rel=0.01)
    f = prefill_flops(4096, 512)
    assert f["topk_exact"] > f["dense"] / 2
    b = decode_bytes(32768, 512)
    assert b["dense"] / b["topk_exact"] < 2 < b["dense"] / b["topk_block"]


def test_decode_kernels_agree_with_the_model(data_dir):
    """The timing kernels compute what TopKAttention computes for the newest token."""
    torch.manual_seed(0)
    H, L, Dh, k, bs, budget = 2, 100, 16, 8, 16, 2
    cfg = ModelConfig(
        vocab_size=8,
        d_model=H * Dh,
        n_layers=1,
        n_heads=H,
        n_kv_heads=H,
        d_ff=8,
        max_seq_len=L,
        attention=AttentionConfig("topk", topk=k, block_size=bs, block_budget=budget),
    )
    q, keys, vals = torch.randn(1, H, L, Dh), torch.randn(1, H, L, Dh), torch.randn(1, H, L, Dh)
    ar = torch.arange(L)
    ctx = AttnContext(None, None, ar[None], (ar[None, :] <= ar[:, None])[None, None], None, True)
    ref_block = TopKAttention(cfg).attend(q, keys, vals, ctx)[0, :, -1]
    exact_cfg = cfg.with_attention(AttentionConfig("topk", topk=k))
    ref_exact = TopKAttention(exact_cfg).attend(q, keys, vals, ctx)[0, :, -1]
    qi, ki, vi = q[0, :, -1], keys[0], vals[0]
    kmin, kmax = block_summaries(ki, bs)
    torch.testing.assert_close(block_topk_decode(qi, ki, vi, kmin, kmax, bs, budget, k), ref_block)
    torch.testing.assert_close(topk_decode(qi, ki, vi, k), ref_exact)
    torch.testing.assert_close(topk_decode(qi, ki, vi, L), dense_decode(qi, ki, vi))


def test_analyze_with_timing_and_report(tmp_path, emb_report):
    torch.set_num_threads(1)
    rep = analyze(timing=True, contexts=[256, 512], repeats=1, prefill_sizes=[(128, 64)])
    assert {"naive_dense", "sdpa_dense", "ragtop_topk_exact", "ragtop_topk_block"} <= set(rep["prefill"][0]["measured"])
    assert all("seconds" in m for m in rep["prefill"][0]["measured"].values())
    assert [d["L"] for d in rep["decode"]] == [256, 512]
    (tmp_path / "analyze.json").write_text(json.dumps(rep))
    (tmp_path / "embeddings-v64.json").write_text(json.dumps(emb_report))
    doc = tmp_path / "r.md"
    doc.write_text(
        "a\n<!-- BEGIN embeddings -->\nold\n<!-- END embeddings -->\nb\n<!-- BEGIN analyze -->\n<!-- END analyze -->\n"
    )
    render(tmp_path, doc)
    text = doc.read_text()
    assert "old" not in text and "tiered, same total" in text and "Measured decode" in text
    assert (tmp_path / "embeddings.png").stat().st_size > 1000 and (tmp_path / "analyze.png").is_file()


def test_cli_errors(capsys):
    assert main(["study", "embeddings", "--setups", "nope", "--out", "x.json"]) == 2
    assert "unknown setup 'nope'" in capsys.readouterr().err
    assert main(["study", "report", "--doc", "/nonexistent.md"]) == 2
    assert "markdown file not found" in capsys.readouterr().err


def test_layout_search_finds_a_known_layout():
    from ragtop.study.layouts import layouts

    # 14 tokens x 8 (no projection) + 6 tokens x 4 + a 4 -> 8 projection
    found = layouts(20, 8, 14 * 8 + 6 * 4 + 4 * 8)
    assert ((8, 4), False, False, (14, 6)) in found
    assert all(sum(f[3]) == 20 for f in found)
