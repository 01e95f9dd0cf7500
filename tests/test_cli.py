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
    (ckpt / "config.json").write_text(
        '{"model": {"vocab_size": 8, "d_model": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, '
        '"d_ff": 8, "max_seq_len": 8}}'
    )
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    assert main(["eval", str(ckpt)]) == 2
    assert "corrupt weights file" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --text" in capsys.readouterr().err


def test_console_script_prints_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ragtop.cli", "eval", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ragtop: error: checkpoint folder not found: {tmp_path / 'nope'}"]


def test_serve_has_one_flag_per_setting_and_maps_it_back():
    """The `ragtop serve` flags are made from ServerSettings' fields: each field has one, and
    the parsed flags give `ServerSettings.load` exactly the fields given (others None)."""
    from dataclasses import fields
    from pathlib import Path

    from ragtop.cli import build_parser
    from ragtop.server.settings import ServerSettings, from_arguments

    parser = build_parser()
    a = parser.parse_args(
        [
            "serve",
            "m",
            "--port",
            "9",
            "--no-plugin",
            "--no-prefix-caching",
            "--cors-origin",
            "http://a",
            "--cors-origin",
            "http://b",
            "--max-batch-size",
            "2",
            "--shutdown-grace-s",
            "1.5",
            "--runner",
            "ort",
            "--replicas",
            "3",
            "--retry-after-s",
            "4",
        ]
    )
    given = {k: v for k, v in from_arguments(a).items() if v is not None}
    assert given == {
        "model": Path("m"),
        "port": 9,
        "plugin": False,
        "prefix_caching": False,
        "cors_origins": ("http://a", "http://b"),
        "max_batch_size": 2,
        "shutdown_grace_s": 1.5,
        "runner": "ort",
        "replicas": 3,
        "retry_after_s": 4,
    }
    assert set(from_arguments(parser.parse_args(["serve"]))) == {f.name for f in fields(ServerSettings)}
    assert all(v is None for v in from_arguments(parser.parse_args(["serve"])).values())
    s = ServerSettings.load(given, environ={})
    assert (s.port, s.plugin, s.cors_origins, s.replicas) == (9, False, ("http://a", "http://b"), 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--max-batch-size", "0"], "must be >= 1, got 0"),
        (["serve", "--runner", "tpu"], "invalid choice: 'tpu'"),
        (["serve", "--port", "x"], "expected an integer, got 'x'"),
    ],
)
def test_serve_flags_refuse_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_serving_commands_do_not_import_torch():
    """`ragtop serve` / `ragtop generate` build only their own parser: PyTorch, installed here,
    stays out of the serving process (hundreds of MB of RSS; docs/server.md, "Footprint")."""
    code = (
        "import sys; from ragtop.cli import build_parser; "
        "[build_parser(c).parse_args([c, 'm'] + (['--prompt', 'x'] if c == 'generate' else [])) "
        "for c in ('serve', 'generate')]; print(sorted(m for m in ('torch', 'onnx', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]"]
