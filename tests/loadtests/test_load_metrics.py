"""Metrics from synthetic timings: every figure computed by hand."""

import math

import pytest

from loadtests.metrics import (
    RequestResult,
    format_summary,
    meets_slos,
    parse_slos,
    stats,
    summarize,
)


def req(i, sent, chunks, tokens=None, ok=True, status=200, prompt=10):
    r = RequestResult(index=i, prompt_tokens=prompt, max_tokens=8, sent=sent, ok=ok, status=status)
    if ok:
        r.chunk_times = list(chunks)
        r.first_token = chunks[0]
        r.done = chunks[-1]
        r.output_tokens = len(chunks) if tokens is None else tokens
    else:
        r.done = sent + 0.01
        r.error = "queue full"
    return r


def test_per_request_latencies():
    r = req(0, sent=1.0, chunks=[1.5, 1.6, 1.8, 2.1])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    # usage says 7 tokens in 4 chunks (the server sent some chunks with several tokens)
    r7 = req(1, sent=1.0, chunks=[1.5, 1.6, 1.8, 2.1], tokens=7)
    assert r7.tpot == pytest.approx(0.6 / 6)
    one = req(2, sent=0.0, chunks=[0.2], tokens=1)
    assert one.tpot is None and one.itls == []


def test_summary_throughput_percentiles_and_failures():
    rs = [
        req(0, 0.0, [0.1, 0.2, 0.3]),  # ttft .1, e2e .3, tpot .1
        req(1, 0.5, [0.9, 1.1, 1.3, 1.5]),  # ttft .4, e2e 1.0, tpot .2
        req(2, 1.0, [1.2, 1.5], tokens=2),  # ttft .2, e2e .5, tpot .3
        req(3, 1.2, [], ok=False, status=429),
    ]
    s = summarize(rs, percentiles=(50, 99))
    assert s["requests"] == 4 and s["completed"] == 3 and s["failed"] == 1
    assert s["failed_by_status"] == {"429": 1} and s["rejected_429"] == 1
    assert s["duration_s"] == pytest.approx(1.5)  # first send 0.0 -> last end 1.5
    assert s["total_output_tokens"] == 3 + 4 + 2
    assert s["total_prompt_tokens"] == 30  # failed requests do not count
    assert s["request_throughput"] == pytest.approx(3 / 1.5)
    assert s["output_throughput"] == pytest.approx(9 / 1.5)
    assert s["total_token_throughput"] == pytest.approx(39 / 1.5)
    assert s["ttft_s"]["mean"] == pytest.approx((0.1 + 0.4 + 0.2) / 3)
    assert s["ttft_s"]["median"] == pytest.approx(0.2)
    assert s["ttft_s"]["p99"] == pytest.approx(0.2 + 0.98 * (0.4 - 0.2))  # linear interpolation
    assert s["tpot_s"]["mean"] == pytest.approx(0.2)
    assert s["e2e_s"]["max"] == pytest.approx(1.0)
    itls = [0.1, 0.1, 0.2, 0.2, 0.2, 0.3]
    assert s["itl_s"]["count"] == 6 and s["itl_s"]["mean"] == pytest.approx(sum(itls) / 6)
    assert s["decode_tokens_per_s"]["max"] == pytest.approx(10.0)
    assert s["goodput"] is None and s["good_requests"] is None
    text = format_summary(s, "synthetic")
    assert "Successful requests:" in text and "429: 1" in text and "Median TTFT (ms):" in text


def test_goodput_counts_requests_meeting_every_slo():
    rs = [req(0, 0.0, [0.1, 0.2, 0.3]), req(1, 0.5, [0.9, 1.1, 1.3, 1.5]), req(2, 1.0, [1.2, 1.5], tokens=2)]
    s = summarize(rs, slos=parse_slos(["ttft:250", "tpot:250"]))
    # r0 ok (.1/.1), r1 fails TTFT (.4), r2 fails TPOT (.3)
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(1 / 1.5)
    assert s["slos_s"] == {"ttft": 0.25, "tpot": 0.25}
    assert meets_slos(rs[1], {"e2e": 1.0}) and not meets_slos(rs[1], {"e2e": 0.99})
    assert not meets_slos(req(9, 0, [], ok=False, status=500), {})


def test_parse_slos_rejects_bad_input():
    assert parse_slos(None) == {}
    assert parse_slos(["E2E:1500"]) == {"e2e": 1.5}
    for bad in (["ttft"], ["itl:10"], ["ttft:abc"], ["tpot:0"]):
        with pytest.raises(ValueError):
            parse_slos(bad)


def test_stats_of_nothing_and_duration_override():
    s = stats([], (50, 99.9))
    assert s["count"] == 0 and s["mean"] is None and s["p99_9"] is None
    s = summarize([req(0, 0.0, [0.5, 1.0])], duration=2.0)
    assert s["request_throughput"] == pytest.approx(0.5) and s["output_throughput"] == pytest.approx(1.0)
    empty = summarize([])
    assert empty["duration_s"] == 0 and empty["request_throughput"] is None
    assert not math.isnan(summarize([req(0, 0.0, [0.5])])["ttft_s"]["mean"])
