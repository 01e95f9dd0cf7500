"""The peers of `make bench-peers` (llama.cpp, ONNX Runtime GenAI) and ragtop's in-process
engine: what runs without their packages (arguments, result parsing, interleaved rounds, the
byte model, the report's comparison rows, the Hugging Face folder the ORT GenAI builder reads),
and, marked slow and skipped without the `peers` extra, the peers themselves on real files."""

import argparse
import json
import time

import numpy as np
import pytest

from loadtests import SCHEMA, bandwidth, peers, report, sweeps
from loadtests.__main__ import main
from loadtests.schema import validate


def result(**over):
    r = {
        "peer": "llama.cpp",
        "context": 64,
        "new_tokens": 8,
        "ttft_s": 0.5,
        "decode_tokens_per_s": 40.0,
        "peak_rss_bytes": 5e8,
    }
    return {**r, **over}


def test_read_result_accepts_a_complete_result_and_names_what_is_wrong(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(result()))
    assert peers.read_result(p)["decode_tokens_per_s"] == 40.0
    p.write_text(json.dumps(result(decode_tokens_per_s=None)))  # one new token: no decode speed
    assert peers.read_result(p)["decode_tokens_per_s"] is None
    for bad, words in (
        (result(ttft_s=0), "ttft_s must be a positive number"),
        (result(peak_rss_bytes="big"), "peak_rss_bytes must be a positive number"),
        (result(decode_tokens_per_s=True), "decode_tokens_per_s"),
        ({"peer": "x"}, "missing context, new_tokens, ttft_s"),
        ([1, 2], "expected a JSON object"),
    ):
        p.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            peers.read_result(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        peers.read_result(p)


def test_timing_from_token_times():
    t = peers.timing("x", 10.0, [12.0, 12.5, 13.0])
    assert t == {"ttft_s": 2.0, "decode_tokens_per_s": 2 / 1.0}
    assert peers.timing("x", 0.0, [1.0])["decode_tokens_per_s"] is None
    with pytest.raises(ValueError, match="no token"):
        peers.timing("x", 0.0, [])


def test_missing_peer_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(peers.PACKAGES, "llama.cpp", ("no_such_module_for_ragtop_tests", "llama-cpp-python"))
    with pytest.raises(peers.PeerMissing, match=r"make bench-peers.*ragtop\[peers\]"):
        peers.require("llama.cpp")


def test_peer_command_rejects_bad_arguments(tmp_path, capsys):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    with pytest.raises(SystemExit, match="not a .gguf file"):
        main(["peer", "llama.cpp", str(tmp_path / "model.bin"), "--context", "16", "--tokenizer", str(tok)])
    with pytest.raises(SystemExit, match="no genai_config.json"):
        main(["peer", "ort-genai", str(tmp_path), "--context", "16", "--tokenizer", str(tok)])
    with pytest.raises(SystemExit, match="new-tokens >= 2"):
        main(["peer", "llama.cpp", str(tmp_path / "m.gguf"), "--context", "16", "--new-tokens", "1"])
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        main(["peer", "llama.cpp", str(gguf), "--context", "16"])
    with pytest.raises(SystemExit):  # argparse: an unknown kind
        main(["peer", "vllm", str(tmp_path), "--context", "16"])
    assert "invalid choice" in capsys.readouterr().err


def sweep_parser():
    p = argparse.ArgumentParser()
    sweeps.add_arguments(p.add_subparsers())
    return p


def test_context_sweep_takes_the_new_peers_and_keeps_the_old_defaults(capsys):
    p = sweep_parser()
    a = p.parse_args(
        ["context-sweep", "--peers", "llama.cpp,ort-genai,ragtop-engine", "--weights", "int4", "--rounds", "3"]
    )
    assert a.peers == ["llama.cpp", "ort-genai", "ragtop-engine"] and a.weights == "int4" and a.rounds == 3
    a = p.parse_args(["context-sweep"])
    assert a.peers == ["transformers", "stock-ort"] and a.weights == "fp32" and a.rounds == 1  # make bench unchanged
    assert p.parse_args(["context-sweep", "--peers", ""]).peers == []
    with pytest.raises(SystemExit):
        p.parse_args(["context-sweep", "--peers", "llama.cpp,llamafile"])
    assert "unknown ['llamafile']" in capsys.readouterr().err


def row(mode, context, tps, ttft=1.0, rss=1e8, ok=True):
    return {
        "model": "m",
        "mode": mode,
        "context": context,
        "new_tokens": 8,
        "ok": ok,
        "error": None if ok else "RuntimeError: boom",
        "decode_tokens_per_s": tps if ok else None,
        "ttft_s": ttft if ok else None,
        "peak_rss_bytes": rss if ok else None,
        "speedup_vs_dense": None,
        "bytes_per_token": None,
        "bandwidth_bound_pct": None,
        "server_decode_tokens_per_s": None,
    }


def test_combine_rounds_reports_the_median_round():
    rows = [
        row("topk", 1024, 10.0, ttft=3.0, rss=5e8),
        row("llama.cpp", 1024, 40.0),
        row("topk", 1024, 14.0, ttft=1.0, rss=6e8),
        row("llama.cpp", 1024, 0, ok=False),
        row("topk", 1024, 12.0, ttft=2.0, rss=4e8),
        row("llama.cpp", 1024, 30.0),
        row("ort-genai", 1024, 0, ok=False),
    ]
    out = {r["mode"]: r for r in sweeps.combine_rounds(rows)}
    t = out["topk"]
    assert (t["decode_tokens_per_s"], t["ttft_s"], t["peak_rss_bytes"]) == (12.0, 2.0, 6e8)
    assert [r["decode_tokens_per_s"] for r in t["rounds"]] == [10.0, 14.0, 12.0]
    lc = out["llama.cpp"]  # two good rounds of three: the lower of the two, the failure kept in `rounds`
    assert lc["decode_tokens_per_s"] == 30.0 and [r["ok"] for r in lc["rounds"]] == [True, False, True]
    assert out["ort-genai"]["ok"] is False and "rounds" not in out["ort-genai"]  # a single round stays as it was
    only_failed = sweeps.combine_rounds([row("topk", 8, 0, ok=False), row("topk", 8, 0, ok=False)])
    assert len(only_failed) == 1 and only_failed[0]["error"] == "RuntimeError: boom"


def test_unpreparable_peers_become_failed_rows_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(peers.PACKAGES, "ort-genai", ("no_such_module_for_ragtop_tests", "onnxruntime-genai"))
    s = argparse.Namespace(peers=["llama.cpp", "ort-genai"], new_tokens=8)
    spec = sweeps.ModelSpec.parse("small=runs/small:1024")
    notes: list[str] = []
    paths, errors = sweeps.prepare_peers(s, spec, tmp_path, {}, 1024, tmp_path, tmp_path, notes)
    assert paths == {}
    assert "needs a GGUF file" in errors["llama.cpp"]  # checked before its package
    assert "make bench-peers" in errors["ort-genai"] and len(notes) == 2
    r = sweeps.failed_peer_row("ort-genai", spec, 1024, s, errors["ort-genai"])
    assert (
        validate(
            {
                "schema": SCHEMA,
                "kind": "context-sweep",
                "started_at": 0,
                "finished_at": 1,
                "machine": {},
                "command": "x",
                "settings": {},
                "bandwidth": None,
                "rows": [r],
                "notes": [],
            }
        )
        == []
    )
    assert r["ok"] is False and r["peer"] is True


def test_gguf_of_needs_the_imported_gguf():
    with pytest.raises(ValueError, match="needs a GGUF file"):
        sweeps.gguf_of(sweeps.ModelSpec.parse("small=runs/small-dense-uniform:32768"))


FACTS = {
    "n_layers": 2,
    "n_kv_heads": 2,
    "head_dim": 4,
    "kv_row_bytes": 2 * 4 * 4,
    "kv_bytes_per_token": 2 * 2 * 32,
    "weight_bytes_read": 1000,
    "dtype_bytes": 4,
}


def test_with_bytes_swaps_weights_and_cache_dtype():
    f = bandwidth.with_bytes(FACTS, 250, 2)
    assert f["weight_bytes_read"] == 250 and f["kv_row_bytes"] == 16 and f["kv_bytes_per_token"] == 64
    assert bandwidth.bytes_per_token(f, "dense", 10)["total"] == 250 + 2 * 10 * 2 * 16
    assert bandwidth.with_bytes(FACTS, None, None) == FACTS


def test_onnx_weight_bytes_counts_one_row_of_a_looked_up_table(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")  # 3200 B, looked up: one row, 32 B
    head = numpy_helper.from_array(np.zeros((8, 100), np.float32), "head")  # 3200 B, read whole
    both = numpy_helper.from_array(np.zeros((10, 8), np.float32), "both")  # looked up and multiplied: whole
    g = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("MatMul", ["e", "head"], ["y"]),
            helper.make_node("Gather", ["both", "ids"], ["e2"]),
            helper.make_node("MatMul", ["e2", "bothT"], ["z"]),
            helper.make_node("Transpose", ["both"], ["bothT"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, [1, 2, 3, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table, head, both],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g), str(path))
    assert bandwidth.onnx_weight_bytes(path) == 32 + 3200 + 320
    assert bandwidth.onnx_kv_dtype_bytes(path) == 2


@pytest.mark.smollm2
def test_gguf_weight_bytes_of_smollm2():
    pytest.importorskip("gguf")
    try:
        from ragtop.convert.gguf import smollm2_path

        path = smollm2_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 GGUF not installed: {e}")
    n = bandwidth.gguf_weight_bytes(path)
    assert 0.9 * path.stat().st_size < n <= path.stat().st_size  # tied head: every tensor is read


def peers_doc():
    rows = []
    for L, top, eng, lc, og in ((1024, 20.0, 22.0, 40.0, 50.0), (8192, 18.0, 19.0, 15.0, 18.0)):
        for mode, tps, ttft, rss in (
            ("topk", top, L / 400, 9e8),
            ("ragtop-engine", eng, L / 410, 8e8),
            ("llama.cpp", lc, L / 100, 6e8),
            ("ort-genai", og, L / 300, 7e8),
        ):
            r = row(mode, L, tps, ttft, rss)
            r["model"] = "smollm2"
            r["peer"] = mode in ("llama.cpp", "ort-genai", "ragtop-engine")
            r["bytes_per_token"], r["bandwidth_bound_pct"] = 150e6, 40.0
            rows.append(r)
    rows.append(
        {
            **row("ort-genai", 4096, 0, ok=False),
            "model": "smollm2",
            "error": "onnxruntime-genai is not installed; install with make bench-peers",
        }
    )
    now = time.time()
    return {
        "schema": SCHEMA,
        "kind": "context-sweep",
        "started_at": now - 60,
        "finished_at": now,
        "machine": {"cpu": "Test CPU", "loadavg": [0.1, 0.1, 0.1]},
        "command": "python -m loadtests context-sweep --peers llama.cpp,ort-genai",
        "settings": {"new_tokens": 64, "repeats": 2, "threads": 1, "weights": "int4", "rounds": 3},
        "bandwidth": None,
        "rows": rows,
        "notes": ["peer note"],
    }


def test_peer_comparisons_and_verdicts():
    comps = report.peer_comparisons(peers_doc())
    c = next(c for c in comps if c["ragtop"] == "topk" and c["peer"] == "llama.cpp" and c["context"] == 8192)
    assert c["decode"] == pytest.approx(18 / 15) and c["ttft"] == pytest.approx(100 / 400)
    assert c["rss"] == pytest.approx(1.5)
    assert report.verdict(c) == "ahead in decode 1.20×, time to first token 0.25×; behind in peak memory 1.50×"
    assert not any(c["peer"] in ("topk", "ragtop-engine") for c in comps)  # only external peers are compared with
    assert len(comps) == 2 * 2 * 2  # (topk, engine) x (llama.cpp, ort-genai) x (1k, 8k); failed rows left out


def test_report_peers_section(tmp_path):
    doc = peers_doc()
    assert validate(doc) == []
    (tmp_path / "peers.json").write_text(json.dumps(doc))
    md = tmp_path / "benchmarks.md"
    assert (
        main(
            [
                "report",
                "--context",
                str(tmp_path / "none.json"),
                "--concurrency",
                str(tmp_path / "none.json"),
                "--peers",
                str(tmp_path / "peers.json"),
                "--out",
                str(md),
                "--plots",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    text = md.read_text()
    sec = text[text.index("## Peers") :]
    assert "| smollm2 | 1024 | peer: llama.cpp (llama-cpp-python, the GGUF) | 40.00 | 10.240 | 600 |" in sec
    assert "| smollm2 | 1024 | top-k exact (plugin) | llama.cpp | 0.50 |" in sec
    assert "behind in decode 0.50×" in sec and "ahead in decode 1.20×" in sec
    assert "decode vs llama.cpp at 1k ≥ 1×: 0.50×, missed (ragtop behind)" in sec
    assert "decode vs llama.cpp at 8k ≥ 2×: 1.20×, missed (ragtop ahead)" in sec
    assert "decode vs ort-genai at 8k ≥ 2×: 1.00×, missed" in sec
    assert "TTFT at 8k ≤ llama.cpp's: 0.25× llama.cpp's, met" in sec
    assert (
        "- top-k exact (plugin) vs llama.cpp: decode ahead at 8192 (1.20×), behind at 1024 (0.50×); "
        "TTFT ahead at 1024 (0.25×), 8192 (0.25×), behind at none"
    ) in sec
    assert "failed: onnxruntime-genai is not installed; install with make bench-peers" in sec
    assert "3 interleaved round(s)" in sec and "weights: int4" in sec and "peer note" in sec
    assert (
        main(
            [
                "report",
                "--context",
                str(tmp_path / "none.json"),
                "--concurrency",
                str(tmp_path / "none.json"),
                "--peers",
                str(tmp_path / "none.json"),
                "--out",
                str(md),
                "--plots",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert "Run `make bench-peers` on a quiet machine" in md.read_text()


def test_hf_folder_holds_the_checkpoint_exactly(tmp_path):
    """What onnxruntime-genai's builder reads: a transformers Llama folder with ragtop's weights."""
    import torch
    import transformers

    from ragtop.checkpoint import load_checkpoint

    ckpt = sweeps.tiny_checkpoint(tmp_path / "ckpt")
    hf_dir = peers.write_hf_folder(ckpt, tmp_path / "hf", max_positions=1024)
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "model.safetensors").is_file()
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["max_position_embeddings"] == 1024
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model = load_checkpoint(ckpt).model.eval()
    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.inference_mode():
        theirs = hf(ids).logits
        ours = model(ids)
        ours = ours.logits if hasattr(ours, "logits") else ours[0] if isinstance(ours, tuple) else ours
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()


# ---------------------------------------------------------------------------------------------------------------
# the real peers (the `peers` extra: make bench-peers); slow


@pytest.mark.slow
@pytest.mark.smollm2
def test_llama_cpp_peer_on_the_gguf(tmp_path):
    """In its own process, as the sweep runs it (a crash of llama.cpp's AMX kernels is retried
    with --no-repack there, and must not take pytest down)."""
    pytest.importorskip("llama_cpp")
    from ragtop.convert.gguf import read_gguf, smollm2_path

    gguf = smollm2_path()
    tok = tmp_path / "tokenizer.json"
    tok.write_text(read_gguf(gguf).tokenizer_json)  # ragtop's tokenizer of the same GGUF: what every system is fed
    s = argparse.Namespace(new_tokens=4, threads=1, request_timeout=600)
    spec = sweeps.ModelSpec.parse("smollm2=smollm2:8192")
    r = sweeps.peer_row("llama.cpp", gguf, spec, 48, s, tmp_path, tokenizer=tok)
    assert r["ok"], r["error"]
    d = r["peer_details"]
    assert d["peer"] == "llama.cpp" and d["threads"] == 1 and r["decode_tokens_per_s"] > 0
    assert d["llama_perf"]["prompt_tokens"] == 48 and d["llama_perf"]["eval_tokens"] == 3
    assert d["repack"] or "--no-repack" in r["note"]


@pytest.mark.slow
def test_ort_genai_peer_on_a_tiny_model(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    ckpt = sweeps.tiny_checkpoint(tmp_path / "ckpt", n_heads=2)
    model = peers.prepare_ort_genai(ckpt, tmp_path / "og", max_positions=256)
    assert (model / "genai_config.json").is_file()
    again = peers.prepare_ort_genai(ckpt, tmp_path / "og", max_positions=256)  # cached: not rebuilt
    assert again == model
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "peer",
                "ort-genai",
                str(model),
                "--context",
                "40",
                "--new-tokens",
                "4",
                "--threads",
                "1",
                "--tokenizer",
                str(ckpt / "tokenizer.json"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = peers.read_result(out)
    assert r["peer"] == "ort-genai" and r["decode_tokens_per_s"] > 0 and r["threads"] == 1
