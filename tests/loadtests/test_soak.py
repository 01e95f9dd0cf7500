"""`python -m loadtests soak` against a real `ragtop serve` on a tiny model, for a few seconds:
the mixed workload (streams, n > 1, disconnects, bad requests) gets no error."""

from __future__ import annotations

import json

from loadtests.__main__ import main


def test_a_short_soak_has_no_errors(tmp_path):
    out = tmp_path / "soak.json"
    assert main(["soak", "--duration", "6", "--concurrency", "4", "--max-tokens", "8", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["errors"] == 0 and doc["outcomes"]["ok"] > 10 and doc["outcomes"].get("expected_4xx", 0) > 0
    assert doc["server_exit_code"] == 0 and doc["server_tracebacks"] == 0
    assert doc["rss_first_bytes"] and doc["rss_last_bytes"]
