"""schemathesis against a real `ragtop serve` (the tiny top-k model): every generated request
to every operation gets no 5xx and a status the OpenAPI document lists; afterwards the server
still answers and exits 0 on SIGTERM. A seeded, bounded run (about a thousand requests); the
long run is `make fuzz`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from loadtests.fuzz import run_fuzz

pytestmark = pytest.mark.skipif(
    shutil.which("st", path=str(Path(sys.executable).parent)) is None,
    reason="schemathesis is not installed (pip install -e '.[test]')",
)


def test_schemathesis_finds_no_server_error(exported, tmp_path):
    doc = run_fuzz(exported["topk"], examples=25, seed=1, workers=2, out_dir=tmp_path)
    assert doc["schemathesis_exit"] == 0, doc["output_tail"]
    assert doc["requests_total"] >= 500 and len(doc["requests_by_operation"]) >= 7
    assert doc["health_after"]["status"] == "ready" and doc["answer_after"] is not None
    assert doc["server_exit_code"] == 0 and doc["server_tracebacks"] == 0
