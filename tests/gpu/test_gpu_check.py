"""scripts/gpu_check.sh, the device check, runs end to end: on CPU through Triton's interpreter
at tiny sizes (what it does when no GPU is lent), or on a GPU at full size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'ragtop[test]')")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~25 s in the interpreter; the kernels themselves are tested by the other modules
def test_gpu_check_script_runs(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(
        ["sh", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["correctness"] and all(c["ok"] for c in report["correctness"])
    assert report["kernels"] and all(k["sdpa_ms"] > 0 and k["triton_block_ms"] > 0 for k in report["kernels"])
    assert report["end_to_end"] and all(e["dense_tok_s"] > 0 and e["block_tok_s"] > 0 for e in report["end_to_end"])
    assert "| model | batch | dense tok/s | block tok/s | speedup |" in (tmp_path / "gpu_check.txt").read_text()
