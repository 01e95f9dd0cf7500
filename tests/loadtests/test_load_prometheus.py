"""A real Prometheus (Debian's `prometheus`, when installed) scraping the fake server: its
rate() ratio equals the two-scrape figure the harness computes without it."""

import asyncio
import shutil

import pytest

from loadtests.loadgen import LoadConfig, run_load
from loadtests.prometheus_server import PrometheusServer

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")


def test_promql_rate_agrees_with_two_scrapes(fake_server, tmp_path):
    fake_server.script.ttft, fake_server.script.itl = 0.0, 0.03
    prom = PrometheusServer.maybe_start(fake_server.url, tmp_path / "prom", required=True)
    try:
        # the warm-up's tokens must stay out of the window: settle_s lets a scrape land after it
        doc = asyncio.run(
            run_load(
                LoadConfig(
                    url=fake_server.url,
                    num_requests=3,
                    output_len=40,
                    max_concurrency=1,
                    progress=False,
                    warmup=1,
                    settle_s=2.0,
                )
            )
        )
        got = prom.decode_rate(since=doc["started_at"] - 1.0)
    finally:
        prom.stop()
    two_scrapes = doc["server"]["decode"]["all"]["tokens_per_s"]
    assert "rate(ragtop:decode_tokens_total" in got["query"]
    assert got["tokens_per_s"] == pytest.approx(two_scrapes, rel=0.10)
