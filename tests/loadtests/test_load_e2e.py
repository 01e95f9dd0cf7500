"""The harness against a real `ragtop serve` process on a tiny exported model (random
weights, exported in-process), and the --quick sweeps end to end (slow)."""

import asyncio
import json
from pathlib import Path

import pytest

from loadtests.loadgen import LoadConfig, run_load
from loadtests.schema import validate
from loadtests.server import ServerProcess
from loadtests.sweeps import tiny_checkpoint
from ragtop.cli import main as ragtop


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    ckpt = tiny_checkpoint(root / "ckpt")
    assert ragtop(["export", str(ckpt), str(root / "onnx"), "--no-validate", "--max-context", "256"]) == 0
    return root / "onnx"


def test_run_against_ragtop_serve(tiny_export, tmp_path):
    with ServerProcess(
        tiny_export,
        ["--threads", "1", "--max-batch-size", "2", "--log-level", "warning"],
        log_path=tmp_path / "serve.log",
    ) as server:
        doc = asyncio.run(
            run_load(
                LoadConfig(
                    url=server.url, num_requests=4, input_len=40, output_len=6, max_concurrency=2, progress=False
                )
            )
        )
        assert server.peak_rss() > 10 * 2**20
    assert validate(doc) == []
    s = doc["summary"]
    assert s["completed"] == 4 and s["total_output_tokens"] == 24  # ignore_eos: exactly max_tokens each
    assert all(r["usage_prompt_tokens"] == 40 for r in doc["requests"])
    assert s["ttft_s"]["min"] > 0 and s["e2e_s"]["max"] >= s["ttft_s"]["max"]
    srv = doc["server"]
    assert srv["generation_tokens"] == 24 and srv["prompt_tokens"] == 160
    dec = srv["decode"]
    assert dec["all"]["tokens"] == 4 * 5 and dec["all"]["tokens_per_s"] > 0
    assert any(k.startswith("dense/0-1k") for k in dec)
    assert srv["peak_resident_memory_bytes"] > 0 and srv["kv_cache_total_bytes"] > 0


def test_burst_meets_429_from_ragtop_serve(tiny_export, tmp_path):
    args = ["--threads", "1", "--max-batch-size", "1", "--max-waiting", "1", "--log-level", "warning"]
    with ServerProcess(tiny_export, args, log_path=tmp_path / "serve.log") as server:
        doc = asyncio.run(
            run_load(LoadConfig(url=server.url, num_requests=8, input_len=40, output_len=30, progress=False))
        )
    s = doc["summary"]
    assert s["rejected_429"] >= 1 and s["completed"] >= 2 and s["completed"] + s["rejected_429"] == 8
    assert all(r["retry_after"] for r in doc["requests"] if r["status"] == 429)
    assert doc["server"]["http_errors"].get("429", 0) == s["rejected_429"]


@pytest.mark.slow
def test_quick_sweeps_and_report(tmp_path):
    from loadtests.__main__ import main

    work = tmp_path / "work"
    assert main(["concurrency-sweep", "--quick", "--work-dir", str(work), "--no-progress"]) == 0
    assert main(["context-sweep", "--quick", "--work-dir", str(work), "--prometheus", "off"]) == 0
    ctx = json.loads((work / "quick-context.json").read_text())
    conc = json.loads((work / "quick-concurrency.json").read_text())
    assert validate(ctx) == [] and validate(conc) == []
    modes = {r["mode"] for r in ctx["rows"] if r["ok"]}
    assert modes == {"dense", "dense-plugin", "topk", "topk-block", "fallback", "transformers", "stock-ort"}
    assert all(r["speedup_vs_dense"] for r in ctx["rows"] if r["ok"])
    assert conc["first_429_clients"] is not None  # the quick burst overflows 2 running + 2 waiting
    md = tmp_path / "benchmarks.md"
    assert (
        main(
            [
                "report",
                "--context",
                str(work / "quick-context.json"),
                "--concurrency",
                str(work / "quick-concurrency.json"),
                "--out",
                str(md),
                "--plots",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert "| 96 | top-k block selection (plugin) |" in md.read_text()
