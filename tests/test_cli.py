"""Bad input: a one-line error naming the problem, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from ragtop.cli import main


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--preset", "huge", "--out", "x"], "unknown preset 'huge'"),
        (["train", "--attention", "topk", "--topk", "0", "--out", "x"], "--topk must be >= 1"),
        (["train", "--attention", "topk", "--out", "x"], "--topk must be >= 1"),
        (["eval", "/nonexistent/ckpt"], "checkpoint folder not found"),
    ],
)
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_checkpoint_and_unreadable_text(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    assert main(["eval", str(ckpt)]) == 2
    assert "corrupt checkpoint config" in capsys.readouterr().err
    (ckpt / "config.json").write_text('{"model": {"vocab_size": 8, "d_model": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 8, "max_seq_len": 8}}')
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    assert main(["eval", str(ckpt)]) == 2
    assert "corrupt weights file" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --text" in capsys.readouterr().err


def test_console_script_prints_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ragtop.cli", "eval", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ragtop: error: checkpoint folder not found: {tmp_path / 'nope'}"]
