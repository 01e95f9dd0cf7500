"""`python -m loadtests admission` on a tiny export: the paged cache runs more requests at once
than whole-context slots at the same memory, nothing fails, the tokens are the same."""

from __future__ import annotations

import json

from loadtests.__main__ import main


def test_admission_paged_runs_more_requests_at_once(tmp_path, capsys):
    args = ["admission", "--tiny", "--context", "256", "--long-prompt", "240", "--short-prompt", "16"]
    args += ["--requests", "10", "--max-batch", "10", "--output", "8", "--budget-contexts", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    doc = json.loads((tmp_path / "admission.json").read_text())
    slots, paged = doc["results"]
    assert slots["peak_running"] == 2 and paged["peak_running"] > 2
    assert slots["failed"] == paged["failed"] == 0 and slots["finished"] == paged["finished"] == 10
    assert doc["summary"]["same_tokens"]
    assert "paged / whole-context" in capsys.readouterr().out
