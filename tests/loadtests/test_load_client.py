"""The load generator against a fake SSE server with known timings (real sockets), the JSON
schema of its result, and the CLI."""

import asyncio
import json

import pytest

from loadtests.__main__ import main
from loadtests.loadgen import LoadConfig, run_load
from loadtests.schema import validate


def run(cfg):
    return asyncio.run(run_load(cfg))


def test_timings_match_the_servers_script(fake_server):
    fake_server.script.ttft, fake_server.script.itl = 0.10, 0.02
    doc = run(
        LoadConfig(
            url=fake_server.url, num_requests=4, input_len=12, output_len=6, max_concurrency=2, progress=False, warmup=0
        )
    )
    assert validate(doc) == []
    s = doc["summary"]
    assert s["completed"] == 4 and s["failed"] == 0 and s["total_output_tokens"] == 24
    # the empty first chunk is not the first token: TTFT is the scripted delay (+ loopback overhead)
    assert 0.10 <= s["ttft_s"]["min"] < 0.10 + 0.15
    assert 0.02 <= s["itl_s"]["median"] < 0.02 + 0.05
    assert s["tpot_s"]["mean"] == pytest.approx(s["itl_s"]["mean"], rel=0.2)
    for r in doc["requests"]:
        assert r["e2e"] >= r["ttft"] + 5 * 0.02 and len(r["itl"]) == 5
    # two clients at a time: the 3rd request was sent when one of the first two ended
    sent = sorted(r["sent"] for r in doc["requests"])
    first_end = min(r["sent"] + r["e2e"] for r in doc["requests"])
    assert sent[1] < 0.05 and sent[2] >= first_end - 0.01
    # what was sent: exact-length token-id prompts, greedy, ignore_eos, streamed with usage
    body = fake_server.script.bodies[-1]
    assert len(body["prompt"]) == 12 and all(isinstance(t, int) for t in body["prompt"])
    assert body["temperature"] == 0 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "fake-model"
    # server-side: the Δ of the decode counters over the run
    dec = doc["server"]["decode"]["all"]
    assert dec["tokens"] == 4 * 5 and dec["tokens_per_s"] == pytest.approx(1 / 0.02, rel=0.5)


def test_429_is_recorded_not_retried(fake_server):
    fake_server.script.capacity, fake_server.script.ttft = 3, 0.2
    doc = run(LoadConfig(url=fake_server.url, num_requests=8, output_len=2, progress=False, warmup=0))
    s = doc["summary"]
    assert s["completed"] == 3 and s["rejected_429"] == 5 and s["failed_by_status"] == {"429": 5}
    bad = [r for r in doc["requests"] if r["status"] == 429]
    assert all(r["retry_after"] == "1" and "queue is full" in r["error"] and not r["ok"] for r in bad)
    assert len(fake_server.script.bodies) == 8
    assert validate(doc) == []


def test_poisson_run_sends_on_schedule(fake_server):
    fake_server.script.ttft, fake_server.script.itl = 0.0, 0.0
    from loadtests.workload import arrival_times

    doc = run(
        LoadConfig(
            url=fake_server.url, num_requests=6, output_len=2, request_rate=20.0, seed=5, progress=False, warmup=0
        )
    )
    want = arrival_times(6, 20.0, seed=5)
    got = sorted(r["sent"] for r in doc["requests"])
    assert got == pytest.approx(want, abs=0.05)
    assert doc["config"]["request_rate"] == 20.0 and doc["config"]["seed"] == 5


def test_cli_run_writes_json_and_summary(fake_server, tmp_path, capsys):
    fake_server.script.ttft, fake_server.script.itl = 0.01, 0.0
    out = tmp_path / "r.json"
    rc = main(
        [
            "run",
            "--url",
            fake_server.url,
            "--num-requests",
            "3",
            "--input-len",
            "5",
            "--output-len",
            "3",
            "--goodput",
            "ttft:5000",
            "tpot:5000",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert validate(doc) == [] and doc["summary"]["good_requests"] == 3
    text = capsys.readouterr().out
    assert "Request goodput (req/s):" in text and "Output token throughput" in text
    assert main(["run", "--url", fake_server.url, "--goodput", "latency:5"]) == 2


def test_schema_reports_problems():
    assert validate({"schema": "nope"})[0].startswith("$.schema")
    assert validate({"schema": "ragtop-loadtest/1", "kind": "what"})[0].startswith("$.kind")
    problems = validate({"schema": "ragtop-loadtest/1", "kind": "run", "label": 3})
    assert "$.label: expected str, got int" in problems and "$.summary: missing" in problems
