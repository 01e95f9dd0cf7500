"""/metrics parses with prometheus_client's parser, the counters move with traffic, and a
client that disconnects mid-stream gives its slot back."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ragtop.server.metrics import context_bucket

from .conftest import wait_until

EXPECTED = {
    "ragtop:time_to_first_token_seconds",
    "ragtop:inter_token_latency_seconds",
    "ragtop:e2e_request_latency_seconds",
    "ragtop:request_queue_time_seconds",
    "ragtop:time_per_output_token_seconds",
    "ragtop:num_requests_running",
    "ragtop:num_requests_waiting",
    "ragtop:prompt_tokens",
    "ragtop:generation_tokens",
    "ragtop:request_success",
    "ragtop:kv_cache_usage_perc",
    "ragtop:kv_cache_used_bytes",
    "ragtop:kv_cache_total_bytes",
    "ragtop:kv_cache_blocks_used",
    "ragtop:kv_cache_blocks_free",
    "ragtop:num_preemptions",
    "ragtop:resident_memory_bytes",
    "ragtop:peak_resident_memory_bytes",
    "ragtop:decode_tokens",
    "ragtop:decode_seconds",
    "process_resident_memory_bytes",
}


def families(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}


def test_metrics_parse_and_move(serve):
    s = serve()
    before = families(s.url)
    assert EXPECTED <= set(before), EXPECTED - set(before)
    r = httpx.post(
        s.url + "/v1/completions",
        json={"prompt": list(range(10, 30)), "max_tokens": 7, "ignore_eos": True, "temperature": 0},
    )
    assert r.status_code == 200
    assert s.metric("ragtop:prompt_tokens_total") == 20
    assert s.metric("ragtop:generation_tokens_total") == 7
    assert s.metric("ragtop:request_success_total", finished_reason="length") == 1
    assert s.metric("ragtop:time_to_first_token_seconds_count") == 1
    assert s.metric("ragtop:inter_token_latency_seconds_count") == 6
    assert s.metric("ragtop:e2e_request_latency_seconds_count") == 1
    assert s.metric("ragtop:request_generation_tokens_sum") == 7
    # 6 decode steps (the first token comes from the prefill), at contexts 21..26: bucket 0-1k, top-k
    assert s.metric("ragtop:decode_tokens_total", context_bucket="0-1k", attention="topk") == 6
    assert s.metric("ragtop:decode_seconds_total", context_bucket="0-1k", attention="topk") > 0
    assert s.metric("ragtop:kv_cache_total_bytes") > 0 and s.metric("ragtop:resident_memory_bytes") > 0
    assert s.metric("ragtop:num_requests_running") == 0


def test_disconnect_mid_stream_frees_the_slot(serve):
    s = serve(max_batch_size=2)
    s.slow_down(0.02)
    body = {"prompt": "The", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert s.metric("ragtop:num_requests_running") == 1
    # the connection is closed here, long before 60 tokens
    wait_until(lambda: s.metric("ragtop:num_requests_running") == 0)
    wait_until(lambda: s.metric("ragtop:request_success_total", finished_reason="abort") == 1)
    assert s.metric("ragtop:generation_tokens_total") < 60
    assert s.state.engine.engine.cache.usage().bytes_used == 0


def test_disconnect_while_waiting_for_a_plain_response(serve):
    s = serve(max_batch_size=2)
    s.slow_down(0.02)
    try:
        httpx.post(s.url + "/v1/completions", json={"prompt": "The", "max_tokens": 80, "ignore_eos": True}, timeout=0.3)
    except httpx.ReadTimeout:
        pass
    wait_until(lambda: s.metric("ragtop:request_success_total", finished_reason="abort") == 1)
    assert s.metric("ragtop:num_requests_running") == 0


def test_context_buckets():
    assert [context_bucket(n) for n in (1, 1024, 1025, 4096, 8000, 16384, 16385, 10**6)] == [
        "0-1k",
        "0-1k",
        "1k-4k",
        "1k-4k",
        "4k-16k",
        "4k-16k",
        "16k+",
        "16k+",
    ]
