"""`ragtop generate`: the generated text only on stdout; problems as one-line errors."""

from __future__ import annotations

from ragtop.cli import main
from ragtop.runtime import Request, SamplingParams, load_model


def test_generate_streams_exactly_the_engine_text(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "Hello world", "--max-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model = load_model(checkpoint)
    out = model.engine().run_until_done(
        [Request("r", model.encode("Hello world"), SamplingParams(max_tokens=12, temperature=0))]
    )
    assert printed == "".join(d.text for o in out["r"] for d in o.deltas)
    assert model.encode("Hello")[0] == model.generation["bos_token_id"]


def test_generate_stop_string_and_seed(checkpoint, capsys):
    args = ["generate", str(checkpoint), "--prompt", "The", "--max-tokens", "20", "--temperature", "1.0", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first
    if len(first) > 3:
        stop = first[2:4]
        assert main([*args, "--stop", stop]) == 0
        assert capsys.readouterr().out == first[: first.index(stop)]


def test_generate_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "word " * 200]) == 2
    err = capsys.readouterr().err
    assert "prompt has" in err and "context limit is 64" in err and err.count("\n") == 1
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "holds neither model.onnx" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in" in capsys.readouterr().err


def test_bench_engine_smoke(checkpoint, capsys):
    import json

    argv = [
        "bench",
        "engine",
        str(checkpoint),
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "3",
        "--streams",
        "1,2",
        "--long-prompt",
        "8",
        "--threads",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["runners"]["torch"]["aggregate_tps"]) == {"1", "2"}
    assert "torch_2_streams_vs_1" in report["ratios"]
    assert main([*argv[:-1], "--new-tokens", "1"]) == 2
