"""`export-model CKPT OUT_DIR` / `ragtop export`: checkpoint -> validated ONNX folder.

    OUT_DIR/model.onnx              (+ model.onnx.data when the weights exceed 1 GiB)
            config.json, generation_config.json, tokenizer.json, tiers.json (when ragged)
            genai_config.json       what a runtime needs (metadata.py, docs/export.md)
            export_report.json      options, validation table, greedy tokens, sizes
            model.ort, required_operators.config       --ort-format
            ort-plugin/model.ort                       --ort-format with the plugin library
            model.int8.onnx                            --quantize int8

Exit codes: 0 exported (and validated), 1 exported but validation failed (see the report),
2 bad input (RagtopError, one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RagtopError
from .weights import WEIGHTS

# onnx, onnxruntime and torch are imported in run(): building the CLI parser stays cheap
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 23  # 23: RMSNormalization + RotaryEmbedding nodes
MARKERS = ("genai_config.json", "model.onnx", "export_report.json")  # what makes a folder an export
DEFAULT_ACCURACY_LEVEL = 0
# int4/int8 matrices as ragtop::MatMulBlocks (the plugin's kernel; the body is MatMulNBits)
# where it was measured faster -- a CPU with AVX-512 VNNI: every row count, decode 1.03-1.12x,
# 1k prefill 1.23-1.27x (docs/kernels.md) -- else MatMulNBits ("auto"; its AVX2 path was not
# measured against MLAS's own AVX2 kernels)
DEFAULT_MATMUL = "auto"


def matmul_for_this_cpu() -> str:
    """`--matmul auto`: custom on a CPU with AVX-512 VNNI (Linux /proc/cpuinfo), else standard."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "standard"
    return "custom" if "avx512_vnni" in flags else "standard"


DEFAULT_ATOL = 1e-4
LEVEL4_RTOL = 0.25  # see tolerances()
FP16_CACHE_RTOL = 2e-3  # --kv-dtype fp16 under fp32 activations: see tolerances()
VALIDATION_TEXT = "The State of the Union is strong, and the people of this nation"


@dataclass(frozen=True)
class ExportOptions:
    """What `ragtop export` takes (the flags of `add_arguments`, by the same names); the CLI
    builds it from its arguments, other code (ragtop/default_model.py) directly."""

    checkpoint: Path
    out_dir: Path
    opset: int = DEFAULT_OPSET
    dtype: str | None = None  # None: fp16 with --weights fp16, else fp32
    weights: str | None = None  # None: as dtype
    kv_dtype: str | None = None  # None: as dtype (the key/value cache's type)
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    ops: str = "custom"
    max_context: int | None = None
    atol: float | None = None
    rtol: float | None = None
    no_validate: bool = False
    ort_format: bool = False
    plugin_library: Path | None = None
    quantize: str | None = None
    eval_text: Path | None = None
    eval_tokens: int = 2048
    data_dir: Path | None = None
    overwrite: bool = False
    paged_kv: bool = False
    matmul: str = DEFAULT_MATMUL

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> ExportOptions:
        return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("out_dir", type=Path, help="output folder")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default=None,
        help="activations and KV cache (default fp32; fp16 with --weights fp16)",
    )
    p.add_argument(
        "--weights",
        choices=list(WEIGHTS),
        default=None,
        help="weights: fp32 / fp16 (as --dtype), or int8 / int4 block-quantized (blocks of 32, "
        "com.microsoft::MatMulNBits; a GGUF import keeps the file's own Q4_1 / Q8_0 blocks)",
    )
    p.add_argument(
        "--kv-dtype",
        choices=["fp32", "fp16"],
        default=None,
        help="key/value cache: fp16 halves its bytes (rounded when written, read as fp32 in the "
        "kernels; block summaries stay exact bounds of the stored keys) (default: as --dtype)",
    )
    p.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 4],
        default=DEFAULT_ACCURACY_LEVEL,
        help="MatMulNBits accuracy_level with int4/int8 weights: 0/1 = fp32 compute on the exact "
        "weights (8-bit matrices as two 4-bit halves); 4 = inputs rounded to int8 per "
        f"block of 32, as llama.cpp computes (faster kernels) (default {DEFAULT_ACCURACY_LEVEL})",
    )
    p.add_argument(
        "--matmul",
        choices=["auto", "custom", "standard"],
        default=DEFAULT_MATMUL,
        help="int4/int8 matrices at --accuracy-level 4: auto = custom on a CPU with AVX-512 VNNI (where it "
        "was measured faster), else standard; custom = 4-bit matrices as ragtop::MatMulBlocks nodes "
        "(the plugin's kernel: each weight block unpacked once for all rows, the Q4_1 minima fused; its function "
        "body is the standard subgraph, so the file runs without the plugin; 8-bit matrices and level 0 stay "
        "MatMulNBits, where the kernel is not faster); standard = com.microsoft::MatMulNBits (+ the minima nodes) "
        f"(default {DEFAULT_MATMUL})",
    )
    p.add_argument(
        "--ops",
        choices=["custom", "standard"],
        default="custom",
        help="custom: ragtop:: nodes with standard-op function bodies (default); standard: standard ops only",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="context limit written to genai_config.json (default: the model's max_seq_len)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="validation: absolute part of the tolerance atol + rtol * max|reference logits| "
        f"(default {DEFAULT_ATOL:g})",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="validation: relative part (default for fp32 and int4/int8 at accuracy level 0/1: 1e-4, "
        f"2e-4 with top-k / block selection; {FP16_CACHE_RTOL:g} with --kv-dtype fp16; 1e-2 for fp16; "
        f"{LEVEL4_RTOL:g} for int4/int8 at level 4)",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-PyTorch validation")
    p.add_argument("--ort-format", action="store_true", help="also write model.ort and required_operators.config")
    p.add_argument(
        "--plugin-library",
        type=Path,
        default=None,
        help="ragtop onnxruntime plugin (.so) for the plugin .ort (default: the one `make install` built, if any)",
    )
    p.add_argument("--quantize", choices=["int8"], default=None, help="also write model.int8.onnx (dynamic int8)")
    p.add_argument(
        "--eval-text",
        type=Path,
        default=None,
        help="UTF-8 text for the int8 top-1 agreement (default: held-out speeches if cached, else random ids)",
    )
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored for the int8 agreement (default 2048)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="corpus cache (default $RAGTOP_DATA_DIR or ~/.cache/ragtop)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument(
        "--paged-kv",
        action="store_true",
        help="also write model.paged.onnx: the same graph over a paged KV cache (block tables; ops.py "
        "TopKAttention input 9), sharing the weights; served with a paged cache (custom ops only)",
    )


class Progress:
    """One line per step with its duration, on stderr (stdout stays for the tables)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def check_args(a: ExportOptions) -> ExportOptions:
    """Refuse contradictory or bad options (RagtopError naming the flag); the options with
    dtype and weights resolved."""
    if a.paged_kv and a.ops != "custom":
        raise RagtopError("--paged-kv needs --ops custom (the block table is an input of ragtop::TopKAttention)")
    if not MIN_OPSET <= a.opset <= MAX_OPSET:
        raise RagtopError(f"unsupported --opset {a.opset}: choose {MIN_OPSET}..{MAX_OPSET}")
    if a.max_context is not None and a.max_context < 1:
        raise RagtopError(f"--max-context must be >= 1, got {a.max_context}")
    if a.atol is not None and not a.atol > 0:
        raise RagtopError(f"--atol must be > 0, got {a.atol}")
    if a.rtol is not None and not a.rtol >= 0:
        raise RagtopError(f"--rtol must be >= 0, got {a.rtol}")
    if a.weights == "fp16" and a.dtype == "fp32":
        raise RagtopError("--weights fp16 computes in fp16: use --dtype fp16 (or leave --dtype out)")
    if a.weights == "fp32" and a.dtype == "fp16":
        raise RagtopError("--weights fp32 with --dtype fp16 is not a combination: use --weights fp16")
    if a.weights in ("int4", "int8") and a.dtype == "fp16":
        raise RagtopError(
            f"--weights {a.weights} runs with fp32 activations (MatMulNBits on CPU computes in fp32 "
            "or int8): use --dtype fp32 (or leave --dtype out)"
        )
    if a.dtype is None:
        a = dataclasses.replace(a, dtype="fp16" if a.weights == "fp16" else "fp32")
    if a.weights is None:
        a = dataclasses.replace(a, weights=a.dtype)
    if a.kv_dtype == "fp32" and a.dtype == "fp16":
        raise RagtopError("--kv-dtype fp32 with fp16 activations is not a combination: leave --kv-dtype out")
    if a.kv_dtype is None:
        a = dataclasses.replace(a, kv_dtype=a.dtype)
    if a.quantize and a.dtype != "fp32":
        raise RagtopError("--quantize int8 needs --dtype fp32")
    if a.quantize and a.weights != "fp32":
        raise RagtopError(f"--quantize int8 (dynamic, of an fp32 graph) does not combine with --weights {a.weights}")
    if a.eval_tokens < 2:
        raise RagtopError(f"--eval-tokens must be >= 2, got {a.eval_tokens}")
    if a.eval_text is not None and not a.eval_text.is_file():
        raise RagtopError(f"--eval-text not found: {a.eval_text}")
    out: Path = a.out_dir
    if out.exists() and not out.is_dir():
        raise RagtopError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()):
        if not a.overwrite:
            raise RagtopError(f"output folder {out} exists and is not empty (use --overwrite)")
        if not any((out / m).exists() for m in MARKERS):
            raise RagtopError(f"refusing to overwrite {out}: it does not look like an export folder")
    return a


def prepare_out_dir(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def prompt_ids(tokenizer, vocab_size: int, bos: int | None) -> list[int]:
    ids = tokenizer.encode(VALIDATION_TEXT).ids if tokenizer is not None else list(range(1, 12))
    ids = ([bos] if bos is not None else []) + ids
    return [i % vocab_size for i in ids][:24]


def eval_ids(a: ExportOptions, tokenizer, vocab_size: int) -> tuple[list[int], str]:
    """Token ids for the int8 agreement and where they come from."""
    text, source = None, None
    if a.eval_text is not None:
        try:
            text, source = a.eval_text.read_text(encoding="utf-8"), str(a.eval_text)
        except (OSError, UnicodeDecodeError) as e:
            raise RagtopError(f"cannot read --eval-text {a.eval_text}: {e}") from None
    else:
        from ..train.corpus import SOTU_DIRNAME, load_sotu, split_by_year

        data_dir = a.data_dir or Path(os.environ.get("RAGTOP_DATA_DIR") or Path.home() / ".cache" / "ragtop")
        if (data_dir / SOTU_DIRNAME / ".complete").is_file():  # never fetch from here
            held_out = split_by_year(load_sotu(data_dir))[1]
            text, source = "\n\n".join(d.text for d in held_out[:3]), "held-out State of the Union speeches"
    if text is not None and tokenizer is not None:
        return tokenizer.encode(text).ids[: a.eval_tokens], source
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, a.eval_tokens).tolist(), "uniform random token ids (no text/tokenizer)"


def size_mb(*paths: Path) -> float:
    return round(sum(p.stat().st_size for p in paths if p.exists()) / 1e6, 3)


def run(a: argparse.Namespace) -> int:
    """`ragtop export` / `export-model`: the parsed arguments as ExportOptions, exported."""
    return export(ExportOptions.from_args(a))


def export(a: ExportOptions) -> int:
    """Export (and validate) a checkpoint; the exit code: 0 done, 1 exported but validation failed."""
    a = check_args(a)
    import onnx
    import onnxruntime

    from ..checkpoint import CONFIG, GENERATION, TIERS, TOKENIZER, load_checkpoint
    from ..quant import load_file_blocks
    from . import weights as qweights
    from .metadata import genai_config
    from .onnx import export_graph, make_spec, save_model
    from .verify import session, validate

    log = Progress()
    log(f"loading checkpoint {a.checkpoint}")
    ckpt = load_checkpoint(a.checkpoint)
    cfg, model = ckpt.config, ckpt.model
    context = a.max_context or cfg.max_seq_len
    matmul = matmul_for_this_cpu() if a.matmul == "auto" else a.matmul
    spec = make_spec(model, context, a.ops, a.dtype, a.opset, a.weights, a.accuracy_level, a.kv_dtype, matmul)
    atol, rtol = tolerances(a, spec.attention_mode)
    planned = qweights.plan(model, a.weights, load_file_blocks(ckpt.path))
    if planned:
        log(f"{a.weights} weights: {qweights.summary(planned)} (matrix count by source)")
    reference = qweights.reference_model(
        model, planned, spec.accuracy_level
    )  # PyTorch computing what the graph computes
    log(
        f"exporting ({a.ops} ops, {spec.attention_mode} attention, "
        f"{f'{spec.num_tiers}-tier ragged' if spec.num_tiers else 'uniform'} embedding, "
        f"{a.dtype}, {a.weights} weights, {a.kv_dtype} KV cache, opset {a.opset})"
    )
    proto = export_graph(model, spec, quantized={k: v.blocks for k, v in planned.items()})
    out: Path = a.out_dir
    prepare_out_dir(out)
    onnx_path = out / "model.onnx"
    save_model(proto, onnx_path)
    external = onnx_path.name + ".data" if (out / (onnx_path.name + ".data")).exists() else None
    log("checking model.onnx (onnx.checker, full check)")
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise RagtopError(f"exported model fails the ONNX checker: {str(e).splitlines()[0]}") from None

    for name in (CONFIG, GENERATION, TOKENIZER, TIERS):
        if (ckpt.path / name).is_file():
            shutil.copy2(ckpt.path / name, out / name)
    tokenizer = ckpt.tokenizer() if (ckpt.path / TOKENIZER).is_file() else None
    if tokenizer is None:
        log(f"warning: {ckpt.path} has no {TOKENIZER}; the export folder has none either")
    (out / "genai_config.json").write_text(
        json.dumps(genai_config(cfg, spec, ckpt.generation, onnx_path.name, external), indent=2) + "\n"
    )

    report: dict = {
        "checkpoint": str(a.checkpoint),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(a).items()},
        "spec": {**spec.__dict__},
        "files": {"model.onnx": size_mb(onnx_path, out / f"{onnx_path.name}.data")},
        "weights": {
            "kind": a.weights,
            "matrices": qweights.summary(planned),
            "accuracy_level": spec.accuracy_level if planned else None,
        },
    }
    ok = True
    ids = prompt_ids(tokenizer, cfg.vocab_size, ckpt.generation.get("bos_token_id"))
    if not a.no_validate:
        level4 = bool(planned) and spec.accuracy_level == 4
        if level4:
            # The same graph at accuracy level 0 computes in fp32 on the same weights: exact to
            # float order, so it is validated at the strict tolerance and proves the graph.
            # Level 4 itself rounds matmul inputs to int8, which 30 layers amplify into
            # differences of the quantization error's own size, so only its cases on real
            # (not random) caches gate, at rtol LEVEL4_RTOL (tolerances(); docs/export.md).
            _, rtol0 = tolerances(dataclasses.replace(a, accuracy_level=0), spec.attention_mode)
            twin = write_level0_twin(onnx_path)
            try:
                v0 = validate(
                    qweights.reference_model(model, planned, 0), session(twin), spec, atol, ids, log=log, rtol=rtol0
                )
            finally:
                twin.unlink()
            print(
                f"validation of model.onnx at accuracy level 0 (onnxruntime {onnxruntime.__version__}, no plugin, "
                f"tolerance {atol:g} + {rtol0:g} * max|reference|, reference: the same dequantized weights)"
            )
            print(v0.table())
            report["validation_level0"] = v0.as_dict()
        v = validate(
            reference,
            session(onnx_path),
            spec,
            atol,
            ids,
            log=log,
            rtol=rtol,
            informational=("mixed_batch", "greedy") if level4 else (),
        )
        print(
            f"validation of model.onnx{' at accuracy level 4' if level4 else ''} "
            f"(onnxruntime {onnxruntime.__version__}, no plugin, "
            f"tolerance {atol:g} + {rtol:g} * max|reference|"
            f"{', reference: the same dequantized weights' if planned else ''}"
            f"{', int8-rounded inputs' if level4 else ''})"
        )
        print(v.table())
        report["validation"] = v.as_dict()
        ok = v.passed and (v0.passed if level4 else True)

    if a.paged_kv:
        from .onnx import write_paged_graph

        name = write_paged_graph(out)
        log(f"wrote {name} (paged KV cache; validated through the runtime's paged == contiguous tests)")
        report["files"][name] = size_mb(out / name)
    if a.ort_format:
        ok &= export_ort(a, out, onnx_path, reference, spec, (atol, rtol), ids, report, log)
    if a.quantize == "int8":
        export_int8(a, out, onnx_path, spec, tokenizer, report, log)

    (out / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    if not ok:
        print(f"export-model: validation FAILED, see {out / 'export_report.json'}", file=sys.stderr)
        return 1
    return 0


def write_level0_twin(onnx_path: Path) -> Path:
    """model.onnx with every MatMulNBits and ragtop::MatMulBlocks at accuracy level 0,
    written beside it (sharing its external weights file) for validation; the caller
    deletes it. (A MatMulBlocks body reads the node's accuracy_level, so it follows.)"""
    import onnx

    from . import ops

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" or (node.domain == ops.DOMAIN and node.op_type == ops.MATMUL_BLOCKS):
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 0
    twin = onnx_path.with_name(onnx_path.stem + ".level0-check.onnx")
    onnx.save(proto, str(twin))
    return twin


def tolerances(a: ExportOptions, attention_mode: str = "dense") -> tuple[float, float]:
    """(atol, rtol) of the validation: |onnx - torch| <= atol + rtol * max|torch| per output.

    fp32 (and int4/int8 at accuracy level 0, which compute in fp32 on the same weights): rtol
    1e-4 — 30 fp32 layers of SmolLM2 differ from PyTorch by up to ~6e-4 on logits of ~30 —
    and 2e-4 when the attention selects keys: there a query may keep another key on a near tie
    of its k-th score (SmolLM2 block selection: 4.3e-3 on logits of 33.6, scripts/block_ties.py).
    Accuracy level 4: its reference rounds each matmul input to int8 as MLAS does
    (weights.Int8ActivationLinear; one node matches it to ~1e-6 of its range, tests/export/
    test_weights.py), but a deep model amplifies the inputs that land on the other side of a
    rounding boundary (and, with block selection, the near-tie block choices they flip):
    SmolLM2 (30 layers) moved by up to 5 % of the logits' range in prefill and 17 % in the
    mixed batch with random caches (other random draws: up to 90 %, scripts/validation_seeds.py),
    and greedy tokens part on near ties. So a level-4 export is validated twice: the same
    graph at level 0 strictly (every case, exact greedy tokens: it proves the graph), then at
    level 4 with rtol 0.25 on prefill, decode and the empty batch (a wrong graph is off by the
    whole range), the mixed batch and greedy tokens reported (`write_level0_twin`).
    A float16 cache (--kv-dtype fp16, fp32 activations): rtol 2e-3. The reference stores the same
    rounded keys, but a key whose fp32 value differs from PyTorch's by ~1e-6 rounds to the
    neighbouring float16 now and then (one step, 2^-10 relative), and 30 layers of such flips
    moved SmolLM2's logits by up to 2.2e-2 on logits of ~35 (6.5e-4 relative; block selection,
    int4 weights at level 0, docs/export.md).
    """
    atol = a.atol if a.atol is not None else DEFAULT_ATOL
    if a.rtol is not None:
        return atol, a.rtol
    if a.weights in ("int4", "int8") and a.accuracy_level == 4:
        return atol, LEVEL4_RTOL
    if a.dtype == "fp16":
        return atol, 1e-2
    if a.kv_dtype == "fp16":
        return atol, FP16_CACHE_RTOL
    return atol, (1e-4 if attention_mode == "dense" else 2e-4)


def export_ort(
    a, out: Path, onnx_path: Path, model, spec, tol: tuple[float, float], ids: list[int], report: dict, log
) -> bool:
    """model.ort (+ required_operators.config) without the plugin; ort-plugin/ with it."""
    from . import mobile
    from .verify import session, validate

    atol, rtol = tol

    log("converting to ORT format (functions inlined, no plugin)")
    ort_file, config = mobile.convert_to_ort(onnx_path, out)
    entry: dict = {"model.ort": size_mb(ort_file), "required_operators": config.name}
    ok = True
    if not a.no_validate:
        v = validate(model, session(ort_file), spec, atol, ids, greedy_tokens=8, rtol=rtol)
        print("validation of model.ort")
        print(v.table())
        entry["validation"] = v.as_dict()
        ok = v.passed
    plugin = mobile.find_plugin_library(a.plugin_library)
    if plugin is None:
        entry["plugin"] = "skipped: no plugin library given or built (plugins/onnxruntime/build/)"
        log("no ragtop plugin library found: skipping the plugin .ort")
    else:
        log(f"converting to ORT format with the plugin {plugin}")
        plugin_ort, _ = mobile.convert_to_ort(onnx_path, out / "ort-plugin", custom_op_library=plugin)
        entry["plugin"] = {"library": str(plugin), "model.ort": size_mb(plugin_ort)}
        if not a.no_validate:
            v = validate(
                model, session(plugin_ort, custom_op_library=str(plugin)), spec, atol, ids, greedy_tokens=8, rtol=rtol
            )
            print("validation of ort-plugin/model.ort (with the plugin)")
            print(v.table())
            entry["plugin"]["validation"] = v.as_dict()
            ok &= v.passed
    report["ort_format"] = entry
    return ok


def export_int8(a, out: Path, onnx_path: Path, spec, tokenizer, report: dict, log) -> None:
    from . import mobile
    from .verify import session

    log("quantizing to int8 (onnxruntime quantize_dynamic)")
    q_path = mobile.quantize_int8(onnx_path, out / "model.int8.onnx")
    ids, source = eval_ids(a, tokenizer, spec.vocab_size)
    log(f"int8 top-1 agreement with fp32 on {len(ids)} tokens ({source})")
    agree = mobile.top1_agreement(session(onnx_path), session(q_path), spec, ids, min(spec.context_limit, 256), source)
    fp32_mb = report["files"]["model.onnx"]
    int8_mb = size_mb(q_path)
    print(
        f"int8: model.int8.onnx {int8_mb} MB (fp32 {fp32_mb} MB), top-1 agreement {agree.top1_agreement:.4f} "
        f"over {agree.tokens} tokens ({source})"
    )
    report["int8"] = {"model.int8.onnx": int8_mb, "fp32_mb": fp32_mb, **agree.__dict__}
