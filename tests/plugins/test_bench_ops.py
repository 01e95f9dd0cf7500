"""`ragtop bench ops --json` runs end to end on tiny shapes (speed itself is never asserted)."""

from __future__ import annotations

import json

import pytest

from ragtop.cli import main
from ragtop.runtime.plugin import plugin_library_path

pytestmark = pytest.mark.skipif(plugin_library_path() is None, reason="plugin library not built (run `make install`)")


def test_bench_ops_json(capsys):
    rc = main(
        [
            "bench",
            "ops",
            "--json",
            "--shapes",
            "small",
            "--decode-lengths",
            "128",
            "--prefill-lengths",
            "128",
            "--block-size",
            "16",
            "--block-budget",
            "2",
            "--seconds",
            "0",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["case"], r["length"]) for r in report["results"]] == [("decode", 128), ("prefill", 128)]
    for r in report["results"]:
        assert set(r["speedup_vs_dense"]) == {"dense_gqa", "dense_ops", "plugin_exact", "plugin_block", "fallback"}
        assert all(v > 0 for v in r["ms"].values())
