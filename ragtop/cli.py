"""The `ragtop` command line: parse arguments into typed configs, call one function.

Every user-facing problem is raised as RagtopError and printed as one line,
`ragtop: error: ...`, with exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import RagtopError


def default_data_dir() -> Path:
    """Where the corpus and tokenizers are cached ($RAGTOP_DATA_DIR, else ~/.cache/ragtop)."""
    return Path(os.environ.get("RAGTOP_DATA_DIR") or Path.home() / ".cache" / "ragtop")


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


# -- train ----------------------------------------------------------------------------
def add_train(sub) -> None:
    from .train.trainer import PRESETS

    p = sub.add_parser("train", help="train a model on the default corpus (State of the Union speeches)")
    p.add_argument("--preset", default="tiny", help=f"model size: {' | '.join(PRESETS)} (default tiny)")
    p.add_argument("--attention", choices=["dense", "topk"], default="dense")
    p.add_argument("--topk", type=int, default=None, help="keys kept per query (with --attention topk)")
    p.add_argument("--embedding", choices=["uniform", "ragged"], default="uniform")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=positive_int, default=200)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder (resumed if it holds a run)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="corpus cache (default $RAGTOP_DATA_DIR or ~/.cache/ragtop)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def run_train(a: argparse.Namespace) -> int:
    from .train.trainer import TrainConfig, train

    tc = TrainConfig(
        preset=a.preset,
        attention=a.attention,
        topk=a.topk,
        embedding=a.embedding,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        eval_every=a.eval_every,
    )
    tc.resolved()  # validate before fetching anything
    out = train(tc, a.out, a.data_dir or default_data_dir(), progress=not a.no_progress)
    print(f"checkpoint written to {out}")
    return 0


# -- eval -----------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out (or a text file's) perplexity and bits per byte")
    p.add_argument("checkpoint", type=Path, nargs="+", help="one or more checkpoint folders")
    p.add_argument("--text", type=Path, default=None, help="score this UTF-8 file instead of the held-out speeches")
    p.add_argument("--context", type=positive_int, default=None, help="window length (default: the model's context)")
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="stop after the document that reaches this many tokens"
    )
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=run_eval)


def run_eval(a: argparse.Namespace) -> int:

    from .checkpoint import load_checkpoint
    from .train.corpus import load_sotu, split_by_year
    from .train.evaluate import evaluate_texts

    if a.text is not None:
        try:
            texts, source = [a.text.read_text(encoding="utf-8")], str(a.text)
        except (OSError, UnicodeDecodeError) as e:
            raise RagtopError(f"cannot read --text {a.text}: {e}") from None
    else:
        texts, source = None, "held-out speeches"
    if not a.json:
        print(f"{'checkpoint':<40} {'context':>7} {'tokens':>9} {'ppl':>9} {'bits/byte':>9}  ({source})")
    for path in a.checkpoint:
        ckpt = load_checkpoint(path)
        if texts is None:
            texts = [d.text for d in split_by_year(load_sotu(a.data_dir or default_data_dir()))[1]]
        gen = ckpt.generation  # imported models name their document separator (SmolLM2: <|endoftext|>)
        bos = gen.get("document_separator_id", gen.get("bos_token_id", 0))
        r = evaluate_texts(ckpt.model, ckpt.tokenizer(), texts, bos, a.context, a.max_tokens)
        if a.json:
            print(
                json.dumps(
                    {
                        "checkpoint": str(path),
                        "source": source,
                        **r.as_dict(),
                        "parameters": ckpt.model.parameter_counts(),
                    }
                )
            )
        else:
            print(f"{str(path):<40} {r.context:>7} {r.tokens:>9} {r.perplexity:>9.3f} {r.bits_per_byte:>9.4f}")
    return 0


# -- export ---------------------------------------------------------------------------
def add_export(sub) -> None:
    from .export import commands

    p = sub.add_parser(
        "export",
        help="export a checkpoint to a validated ONNX folder (also `export-model`)",
        description=commands.__doc__.split("\n\n")[0],
    )
    commands.add_arguments(p)
    p.set_defaults(func=commands.run)


# -- serve ------------------------------------------------------------------------------
def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (default model: SmolLM2, prepared on first run)",
        description="Serve MODEL_DIR (an exported folder or a checkpoint) over OpenAI-compatible HTTP. "
        "Every flag also reads RAGTOP_<NAME> from the environment (e.g. RAGTOP_API_KEY); "
        "a flag given wins. Without MODEL_DIR (or RAGTOP_MODEL), serve the default model: "
        "SmolLM2-135M-Instruct with top-k attention, imported and exported into the data "
        "folder on first run.",
    )
    from .server.settings import add_arguments

    add_arguments(p)  # one flag per ServerSettings field
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the default model is cached (default $RAGTOP_DATA_DIR or ~/.cache/ragtop)",
    )
    p.set_defaults(func=run_serve)


def run_serve(a: argparse.Namespace) -> int:
    from .server.run import serve
    from .server.settings import ServerSettings, from_arguments

    overrides = from_arguments(a)
    settings = ServerSettings.load(overrides)
    prepare = None
    if settings.model is None:  # the default model, imported and exported on first run
        from .default_model import SERVED_NAME, ensure_default_model, prepare_in_child

        data_dir = a.data_dir or default_data_dir()
        settings = dataclasses.replace(settings, served_model_name=settings.served_model_name or SERVED_NAME)

        def prepare(progress: Callable[[str], None]) -> Path:  # in a child: its memory goes when it ends
            return prepare_in_child(data_dir, log=progress)

    if settings.scale_out:  # only then is Ray imported
        from .server.ray import serve_forever

        if prepare is not None:  # every replica loads the prepared folder
            settings = dataclasses.replace(settings, model=ensure_default_model(data_dir))
        return serve_forever(settings)
    return serve(settings, prepare)  # the port opens before `prepare` runs (503 "loading" meanwhile)


# -- generate / bench engine ------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion of --prompt (exported folder or checkpoint)")
    p.add_argument("model", type=Path, help="exported folder (model.onnx) or checkpoint (model.safetensors)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--runner", choices=["ort", "torch"], default=None, help="default: by the files in MODEL")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument(
        "--device",
        default=None,
        help="where a checkpoint runs (torch runner): cpu (default) or cuda, "
        "which runs block-selection decode and ragged embeddings as Triton kernels",
    )
    p.set_defaults(func=run_generate)


def run_generate(a: argparse.Namespace) -> int:
    from .runtime.generate import generate
    from .runtime.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        stop=tuple(a.stop),
    )
    generate(a.model, a.prompt, params, a.runner or "auto", threads=a.threads, device=a.device)
    return 0


# -- bench ----------------------------------------------------------------------------
def add_bench(sub) -> None:
    from .bench import block_quality, gpu, ops, retrieval, speculative
    from .runtime import bench as engine_bench

    p = sub.add_parser("bench", help="benchmarks measured on this machine")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    o = bench.add_parser("ops", help="one attention layer: plugin exact / block selection vs fallback vs dense")
    ops.add_arguments(o)
    o.set_defaults(func=ops.run)
    q = bench.add_parser("block-quality", help="perplexity and greedy agreement of block selection vs exact top-k")
    block_quality.add_arguments(q)
    q.set_defaults(func=lambda a: block_quality.run(a, default_data_dir()))
    r = bench.add_parser(
        "retrieval", help="pass key hidden at varying depth in long filler text: accuracy of dense vs sparse settings"
    )
    retrieval.add_arguments(r)
    r.set_defaults(func=retrieval.run)
    sp = bench.add_parser(
        "speculative", help="self-speculative greedy decoding: acceptance of a sparse draft, dense verify"
    )
    speculative.add_arguments(sp)
    sp.set_defaults(func=lambda a: speculative.run(a, default_data_dir()))
    g = bench.add_parser(
        "gpu",
        help="Triton kernels on the GPU: correctness, block selection vs SDPA decode, "
        "TorchRunner dense vs block tok/s (scripts/gpu_check.sh)",
    )
    gpu.add_arguments(g)
    g.set_defaults(func=gpu.run)
    e = bench.add_parser(
        "engine", help="decode tokens/s: OrtRunner, TorchRunner, transformers; 1/4/16 streams; prompt throughput"
    )
    engine_bench.add_arguments(e)
    e.set_defaults(func=engine_bench.run)


# -- study / analyze (logic in ragtop/study) ------------------------------------------
def add_study(sub) -> None:
    from .study.cli import add_study as add

    add(sub)


def add_analyze(sub) -> None:
    from .study.cli import add_analyze as add

    add(sub)


# -- import / convert / sweep (ragtop/convert/commands.py) --------------------------
def add_convert_commands(sub) -> None:
    from .convert.commands import add_parsers

    add_parsers(sub, default_data_dir)
    sub.choices["sweep"].set_defaults(func=run_sweep)


def run_sweep(a: argparse.Namespace) -> int:
    """`ragtop sweep`: the PyTorch reference in convert; `--setting ... --runner onnx` scores on
    the plugin kernel, which convert may not import (bench/onnx_sweep.py)."""
    if a.setting and a.runner == "onnx":
        from .bench.onnx_sweep import calibration_command

        return calibration_command(a)
    from .convert.commands import run_sweep_command

    return run_sweep_command(a)


# -- entry points ---------------------------------------------------------------------
COMMANDS: list[Callable] = [
    add_train,
    add_eval,
    add_convert_commands,
    add_export,
    add_generate,
    add_serve,
    add_bench,
    add_study,
    add_analyze,
]


# The commands each `add_*` registers: for a base install (no PyTorch), where its module
# cannot be imported (`ragtop serve` and `ragtop generate` of exported models work there), and
# to build only the parser of the command given (see build_parser).
COMMAND_NAMES = {
    add_train: ("train",),
    add_eval: ("eval",),
    add_convert_commands: ("import", "convert", "allocate-budgets", "sweep"),
    add_export: ("export",),
    add_generate: ("generate",),
    add_serve: ("serve",),
    add_bench: ("bench",),
    add_study: ("study",),
    add_analyze: ("analyze",),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, with `command` (a known command's name), of that one
    only: registering a command imports its module, and the training commands import PyTorch,
    which `ragtop serve` must not carry (hundreds of MB; docs/server.md, "Footprint")."""
    parser = argparse.ArgumentParser(
        prog="ragtop", description="Top-k sparse attention and ragged embeddings: train, import, export, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = [add for add in COMMANDS if command in COMMAND_NAMES[add]] or COMMANDS
    for add in chosen:
        try:
            add(sub)
        except ImportError as e:  # the train extra is not installed
            for name in COMMAND_NAMES[add]:
                _unavailable(sub, name, e)
    return parser


def _unavailable(sub, name: str, error: ImportError) -> None:
    missing = error.name or str(error)

    def refuse(a: argparse.Namespace) -> int:
        raise RagtopError(f"'ragtop {name}' needs {missing}, which is not installed: pip install 'ragtop[train]'")

    # prefix_chars that no argument uses: every argument lands in `args`, so any command line
    # of the real command gets this error rather than a usage message
    p = sub.add_parser(
        name, help="(needs the train extra: pip install 'ragtop[train]')", add_help=False, prefix_chars="\0"
    )
    p.add_argument("args", nargs="*")
    p.set_defaults(func=refuse)


def run(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RagtopError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(argv, build_parser(argv[0] if argv else None))


def export_model_main(argv: Sequence[str] | None = None) -> int:
    """`export-model CKPT OUT_DIR ...`: the same as `ragtop export`."""
    return main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
