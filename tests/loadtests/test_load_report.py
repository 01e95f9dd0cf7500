"""Bytes per token, server-side rates from two scrapes, and the report (markdown + PNGs)."""

import json
import time

import pytest

from loadtests import SCHEMA, bandwidth, prom, report
from loadtests.metrics import RequestResult, summarize
from loadtests.schema import validate

FACTS = {"n_layers": 6, "kv_row_bytes": 8 * 32 * 4, "weight_bytes_read": 27_000_000}


def test_bytes_per_token_by_mode():
    s, n, L = 1024, 6, 8192
    assert bandwidth.bytes_per_token(FACTS, "dense", L)["kv"] == n * L * 2 * s
    assert bandwidth.bytes_per_token(FACTS, "topk", L, topk=256)["kv"] == n * (L * s + 256 * s)
    b = bandwidth.bytes_per_token(FACTS, "topk-block", L, topk=256, block_size=32, block_budget=16)
    assert b["selector"] == n * 2 * (L // 32) * s and b["kv"] == n * (17 * 32 * s + 256 * s)
    assert b["total"] == b["weights"] + b["kv"] + b["selector"] and b["weights"] == 27_000_000
    short = bandwidth.bytes_per_token(FACTS, "topk-block", 40, topk=256, block_size=32, block_budget=16)
    assert short["kv"] == n * (40 * s + 40 * s)  # fewer keys than the budget: all of them
    assert bandwidth.bytes_per_token(FACTS, "fallback", 100, capacity=500)["kv"] == n * 500 * 2 * s
    with pytest.raises(ValueError):
        bandwidth.bytes_per_token(FACTS, "topk-block", L, topk=8)


def test_bandwidth_probe_runs_small():
    r = bandwidth.probe(size_mb=8, threads=2, repeats=2)
    assert r["read_gbps"] > 0 and r["copy_gbps"] > 0 and r["threads"] == 2


def scrape(tokens, seconds, at):
    return prom.parse(
        "# TYPE ragtop:decode_tokens_total counter\n"
        f'ragtop:decode_tokens_total{{attention="topk",context_bucket="1k-4k"}} {tokens[0]}\n'
        f'ragtop:decode_tokens_total{{attention="topk",context_bucket="4k-16k"}} {tokens[1]}\n'
        "# TYPE ragtop:decode_seconds_total counter\n"
        f'ragtop:decode_seconds_total{{attention="topk",context_bucket="1k-4k"}} {seconds[0]}\n'
        f'ragtop:decode_seconds_total{{attention="topk",context_bucket="4k-16k"}} {seconds[1]}\n'
        "# TYPE ragtop:generation_tokens_total counter\n"
        f"ragtop:generation_tokens_total {sum(tokens)}\n"
        "# TYPE ragtop:peak_resident_memory_bytes gauge\n"
        "ragtop:peak_resident_memory_bytes 123.0\n",
        at=at,
    )


def test_rate_from_two_scrapes_is_the_promql_ratio():
    a, b = scrape((100, 0), (10, 0), at=1000.0), scrape((300, 50), (20, 5), at=1010.0)
    d = prom.decode_throughput(a, b)
    assert d["topk/1k-4k"] == {"tokens": 200, "seconds": 10, "tokens_per_s": 20}
    assert d["topk/4k-16k"]["tokens_per_s"] == 10
    # rate(tokens[w]) / rate(seconds[w]) over the same window == Δtokens / Δseconds
    assert d["all"]["tokens_per_s"] == pytest.approx(250 / 15)
    s = prom.server_summary(a, b)
    assert s["generation_tokens_per_s"] == pytest.approx(25.0) and s["peak_resident_memory_bytes"] == 123
    assert prom.server_summary(None, b) is None


def fake_summary():
    r = RequestResult(
        0,
        10,
        4,
        sent=0.0,
        ok=True,
        status=200,
        first_token=0.1,
        chunk_times=[0.1, 0.2, 0.3, 0.4],
        done=0.4,
        output_tokens=4,
    )
    return summarize([r])


def context_doc():
    rows = []
    for L in (1024, 8192, 32768):
        for mode, tps in (
            ("dense", 10.0),
            ("topk", 12.0),
            ("topk-block", 30.0 if L < 32768 else 45.0),
            ("fallback", 5.0),
            ("transformers", 6.0),
            ("stock-ort", 7.0),
        ):
            peer = mode in ("transformers", "stock-ort")
            split = bandwidth.bytes_per_token(FACTS, "dense" if peer else mode, L, 256, 32, 16, L + 80)
            rows.append(
                {
                    "model": "small",
                    "mode": mode,
                    "context": L,
                    "new_tokens": 64,
                    "ok": True,
                    "error": None,
                    "decode_tokens_per_s": tps,
                    "ttft_s": L / 1000,
                    "peak_rss_bytes": 600e6,
                    "speedup_vs_dense": tps / 10.0,
                    "bytes_per_token": split["total"],
                    "bytes_per_token_split": split,
                    "bandwidth_bound_pct": 12.5,
                    "server_decode_tokens_per_s": None if peer else tps * 1.03,
                    "server_vs_client": None if peer else 1.03,
                    "peer": peer,
                    "kv_cache_total_bytes": None if peer else 400e6,
                }
            )
    rows.append(
        {
            "model": "small",
            "mode": "fallback",
            "context": 65536,
            "new_tokens": 64,
            "ok": False,
            "error": "RuntimeError: out of memory",
            "decode_tokens_per_s": None,
            "ttft_s": None,
            "peak_rss_bytes": None,
            "speedup_vs_dense": None,
            "bytes_per_token": None,
            "bandwidth_bound_pct": None,
            "server_decode_tokens_per_s": None,
        }
    )
    now = time.time()
    return {
        "schema": SCHEMA,
        "kind": "context-sweep",
        "started_at": now - 600,
        "finished_at": now,
        "machine": {"cpu": "Test CPU", "cpu_count": 2, "memory_gib": 24},
        "command": "python -m loadtests context-sweep",
        "settings": {
            "new_tokens": 64,
            "repeats": 2,
            "topk": 256,
            "block_size": 32,
            "block_budget": 16,
            "threads": 2,
            "plugin_library": "/x/libragtop_ort.so",
        },
        "bandwidth": {
            "array_mib": 1024,
            "threads": 2,
            "read_gbps_1_thread": 10.0,
            "read_gbps_threads": 15.0,
            "copy_gbps": 8.0,
            "read_gbps": 15.0,
        },
        "rows": rows,
        "notes": ["a note"],
    }


def concurrency_doc():
    now = time.time()
    lv = [
        {
            "clients": c,
            "burst": False,
            "summary": fake_summary(),
            "server": None,
            "retry_after": [],
            "accepted_in_flight": None,
        }
        for c in (1, 4, 16, 64)
    ]
    b = fake_summary()
    b["rejected_429"], b["failed_by_status"] = 56, {"429": 56}
    lv.append(
        {"clients": 128, "burst": True, "summary": b, "server": None, "retry_after": ["1"], "accepted_in_flight": 72}
    )
    return {
        "schema": SCHEMA,
        "kind": "concurrency-sweep",
        "started_at": now - 60,
        "finished_at": now,
        "machine": {"cpu": "Test CPU"},
        "command": "python -m loadtests concurrency-sweep",
        "settings": {
            "server_args": ["--max-batch-size", "8"],
            "input_len": 128,
            "output_len": 64,
            "goodput": ["ttft:2000"],
            "max_batch_size": 8,
            "max_waiting": 64,
            "model_served": None,
        },
        "levels": lv,
        "first_429_clients": 128,
        "notes": [],
    }


def test_report_from_results(tmp_path):
    ctx, conc = context_doc(), concurrency_doc()
    assert validate(ctx) == [] and validate(conc) == []
    (tmp_path / "context.json").write_text(json.dumps(ctx))
    (tmp_path / "concurrency.json").write_text(json.dumps(conc))
    md, plots = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "benchmarks"
    from loadtests.__main__ import main

    assert (
        main(
            [
                "report",
                "--context",
                str(tmp_path / "context.json"),
                "--concurrency",
                str(tmp_path / "concurrency.json"),
                "--out",
                str(md),
                "--plots",
                str(plots),
            ]
        )
        == 0
    )
    text = md.read_text()
    for name in report.PLOTS.values():
        assert (plots / name).stat().st_size > 1000 and f"(benchmarks/{name})" in text
    assert "| 8192 | top-k block selection (plugin) | 30.00 |" in text
    assert "small, 8k: block selection 3.00× dense (target 2×): met" in text
    assert "small, 32k: block selection 4.50× dense (target 5×): missed by 0.50× (10 % short)" in text
    assert "failed: RuntimeError: out of memory" in text
    measured = text.split("## Peers")[0]  # no peers.json here: that section alone says "not yet measured"
    assert "within 10 %" in text and "Test CPU" in text and "not yet measured" not in measured.lower()
    assert "| burst 128 |" in text and "72 were accepted" in text and "First 429 at: a burst of 128" in text


def test_report_without_results_says_not_yet_measured(tmp_path):
    md = tmp_path / "benchmarks.md"
    from loadtests.__main__ import main

    assert (
        main(
            [
                "report",
                "--context",
                str(tmp_path / "none.json"),
                "--concurrency",
                str(tmp_path / "none2.json"),
                "--out",
                str(md),
                "--plots",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    text = md.read_text()
    assert text.count("Not yet measured") >= 3 and "make bench" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": SCHEMA, "kind": "context-sweep"}))
    with pytest.raises(ValueError, match="does not match"):
        report.load(bad)


def test_report_appends_hand_measured_sections(tmp_path):
    """plots/*.section.md (figures measured outside make bench, with their commands) close the report."""
    plots = tmp_path / "p"
    plots.mkdir()
    (plots / "weights.section.md").write_text("## Quantized weights\n\n| a | b |\n")
    text = report.build(None, None, tmp_path / "benchmarks.md", plots)
    assert text.rstrip().endswith("## Quantized weights\n\n| a | b |")
