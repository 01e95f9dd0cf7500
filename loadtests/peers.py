"""Peers on the same weights, outside ragtop's server: each runs in its own process
(`python -m loadtests peer KIND ...`) so that its peak resident memory is its own.

- `transformers`: a LlamaForCausalLM holding the checkpoint's weights
  (`ragtop.runtime.bench.to_hf_llama`; dense + uniform models only), `generate` on CPU with
  SDPA attention (the strongest stock transformers path on CPU; eager attention would
  materialise a T x T score matrix per head at long prompts), greedy, a streamer timing
  every token.
- `stock-ort`: the `--ops standard` export (no custom ops) on a plain onnxruntime session
  without the plugin, driven the best way a stock runtime allows: preallocated cache buffers
  bound as both past and present (IO binding, updated in place), prefill in chunks.

- `llama.cpp`: llama-cpp-python (the `peers` extra, `make bench-peers`) on the GGUF that ragtop
  imports (SmolLM2's Q4_1 file: the weights a llama.cpp user runs), n_threads = n_threads_batch
  = --threads, n_batch 512, greedy argmax over its logits; its own perf counters are kept too.
- `ort-genai`: onnxruntime-genai's Generator on the int4 model its builder makes from the same
  weights (`prepare_ort_genai`: a Hugging Face folder written from ragtop's dense checkpoint,
  then `python -m onnxruntime_genai.models.builder -p int4 -e cpu`, offline), greedy, its
  session's intra-op threads = --threads.
- `ragtop-engine`: ragtop's own LLMEngine in this process (no server, no HTTP) on an export:
  what the served mode costs without the HTTP layer.

Every kind is fed the same prompt token ids (BASE_TEXT in ragtop's tokenizer of the checkpoint,
tiled to --context; SmolLM2's GGUF has the same vocabulary), so the prompt lengths are exact.
All print (and write with --json) {"ttft_s", "decode_tokens_per_s", "peak_rss_bytes", ...}:
TTFT = prompt in -> first new token; decode tokens/s = (new tokens - 1) / (last - first).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from .workload import BASE_TEXT, tile


def prompt_ids(tokenizer_json: Path, length: int) -> list[int]:
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(tokenizer_json)).encode(BASE_TEXT, add_special_tokens=False).ids
    return tile(base, length)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across
    fork + exec, so a peer started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def run_transformers(checkpoint: Path, context: int, new_tokens: int, threads: int | None) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from ragtop.checkpoint import load_checkpoint
    from ragtop.runtime.bench import to_hf_llama

    if threads:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    c = ckpt.model.config
    if c.attention.kind != "dense" or c.embedding.kind != "uniform":
        raise SystemExit(
            f"transformers peer: {checkpoint} is {c.attention.kind}/{c.embedding.kind}; "
            "only dense + uniform models have a transformers twin"
        )
    hf = to_hf_llama(ckpt.model)
    hf.config.max_position_embeddings = max(hf.config.max_position_embeddings, context + new_tokens)
    attn = "sdpa"
    try:
        hf.set_attn_implementation("sdpa")
    except (AttributeError, ValueError, ImportError):
        attn = "eager"
    ids = torch.tensor([prompt_ids(checkpoint / "tokenizer.json", context)])

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.calls = 0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls > 1:  # the first call is the prompt
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    with torch.inference_mode():
        hf.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        clock = Clock()
        t0 = time.perf_counter()
        out = hf.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock
        )
    assert out.shape[1] == context + new_tokens
    t = clock.times
    return {
        "peer": "transformers",
        "attention_implementation": attn,
        "context": context,
        "new_tokens": new_tokens,
        "ttft_s": t[0] - t0,
        "decode_tokens_per_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None,
        "peak_rss_bytes": peak_rss(),
        "threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
    }


def run_stock_ort(
    export_dir: Path, context: int, new_tokens: int, threads: int | None, prefill_chunk: int = 256
) -> dict[str, Any]:
    import onnxruntime as ort

    g = json.loads((export_dir / "genai_config.json").read_text())
    dec, rt = g["model"]["decoder"], g["ragtop"]
    if rt.get("custom_ops"):
        raise SystemExit(f"stock-ort peer: {export_dir} has custom ops; export it with --ops standard")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(export_dir / dec["filename"]), so, providers=["CPUExecutionProvider"])
    capacity = context + new_tokens
    mult = int(rt["kv_cache"].get("capacity_multiple") or 1)
    capacity = -(-capacity // mult) * mult
    n, hkv, dh = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    dtype = np.float16 if dec.get("dtype") == "fp16" else np.float32
    names_in, names_out = dec["inputs"], dec["outputs"]
    buffers = []
    for i in range(n):
        for kin, kout in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names")):
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, hkv, capacity, dh), dtype=dtype))
            buffers.append((names_in[kin] % i, names_out[kout] % i, buf))
    length = 0

    def step(ids: list[int]) -> int:
        nonlocal length
        io = sess.io_binding()
        io.bind_cpu_input(names_in["input_ids"], np.array([ids], dtype=np.int64))
        io.bind_cpu_input(names_in["past_lengths"], np.array([length], dtype=np.int64))
        io.bind_cpu_input(names_in["logits_indices"], np.array([[len(ids) - 1]], dtype=np.int64))
        io.bind_output(names_out["logits"])
        for past, present, buf in buffers:
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)
        sess.run_with_iobinding(io)
        length += len(ids)
        return int(io.get_outputs()[0].numpy()[0, -1].argmax())

    prompt = prompt_ids(export_dir / "tokenizer.json", context)
    step(prompt[:8])  # warm-up (then overwritten: positions restart at 0)
    length = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompt), prefill_chunk):
        tok = step(prompt[s : s + prefill_chunk])
    times = [time.perf_counter()]
    for _ in range(new_tokens - 1):
        tok = step([tok])
        times.append(time.perf_counter())
    return {
        "peer": "stock-ort",
        "context": context,
        "new_tokens": new_tokens,
        "ttft_s": times[0] - t0,
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
        "peak_rss_bytes": peak_rss(),
        "capacity": capacity,
        "prefill_chunk": prefill_chunk,
        "threads": threads,
        "onnxruntime": ort.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp, ONNX Runtime GenAI, ragtop's in-process engine

KINDS = ("transformers", "stock-ort", "llama.cpp", "ort-genai", "ragtop-engine")
# kind -> (the module it imports, how to install it)
PACKAGES = {"llama.cpp": ("llama_cpp", "llama-cpp-python"), "ort-genai": ("onnxruntime_genai", "onnxruntime-genai")}
RESULT_KEYS = ("peer", "context", "new_tokens", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes")


class PeerMissing(RuntimeError):
    """A peer's package is not installed (the `peers` extra)."""


def require(kind: str):
    """Import a peer's package, or fail with the command that installs it."""
    import importlib

    module, dist = PACKAGES[kind]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerMissing(
            f"{kind} peer: the Python package {dist!r} is not installed ({e}); install it with "
            f"`make bench-peers` (builds llama.cpp's library only) or `pip install 'ragtop[peers]'`"
        ) from e


def timing(peer: str, t0: float, times: list[float]) -> dict[str, Any]:
    """TTFT and decode tokens/s from the start time and the time each new token was known."""
    if not times:
        raise ValueError(f"{peer}: no token was generated")
    return {
        "ttft_s": times[0] - t0,
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
    }


def read_result(path: Path) -> dict[str, Any]:
    """A peer's --json result, checked: a missing or non-numeric figure is an error, not a blank row."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"peer result {path}: unreadable ({e})") from e
    if not isinstance(r, dict):
        raise ValueError(f"peer result {path}: expected a JSON object")
    missing = [k for k in RESULT_KEYS if k not in r]
    if missing:
        raise ValueError(f"peer result {path}: missing {', '.join(missing)}")
    for k in ("ttft_s", "peak_rss_bytes"):
        if not isinstance(r[k], int | float) or isinstance(r[k], bool) or r[k] <= 0:
            raise ValueError(f"peer result {path}: {k} must be a positive number, got {r[k]!r}")
    d = r["decode_tokens_per_s"]
    if d is not None and (not isinstance(d, int | float) or isinstance(d, bool) or d <= 0):
        raise ValueError(f"peer result {path}: decode_tokens_per_s must be a positive number or null, got {d!r}")
    return r


def open_llama(llama_cpp, gguf: Path, n_ctx: int, threads: int, repack: bool):
    """llama_cpp.Llama with llama.cpp's defaults, or with its extra CPU buffer types (weight
    repacking, AMX) off: the CLI's `--no-repack`, which the Python class does not expose (it
    reads llama_model_default_params, so that is wrapped while the model loads)."""
    if repack:
        return llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
        )
    low = llama_cpp.llama_cpp  # the ctypes module, whose function llama.py calls
    defaults = low.llama_model_default_params

    def no_repack():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
        )
    finally:
        low.llama_model_default_params = defaults


def run_llama_cpp(
    gguf: Path, context: int, new_tokens: int, threads: int | None, tokenizer_json: Path, repack: bool = True
) -> dict[str, Any]:
    """llama.cpp on the GGUF itself: prefill with eval (batches of 512), then one eval per token;
    the next token is the argmax of the last logits (greedy, as the other systems)."""
    if not Path(gguf).is_file() or Path(gguf).suffix != ".gguf":
        raise SystemExit(f"llama.cpp peer: {gguf} is not a .gguf file")
    llama_cpp = require("llama.cpp")
    import os

    threads = threads or os.cpu_count() or 1
    llm = open_llama(llama_cpp, gguf, context + new_tokens + 16, threads, repack)
    prompt = prompt_ids(tokenizer_json, context)

    def last_token() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    llm.eval(prompt[:8])  # warm-up, then forgotten
    last_token()
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = last_token()
    times = [time.perf_counter()]
    for _ in range(new_tokens - 1):
        llm.eval([tok])
        tok = last_token()
        times.append(time.perf_counter())
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    own = {
        "prompt_ms": perf.t_p_eval_ms,
        "prompt_tokens": perf.n_p_eval,
        "eval_ms": perf.t_eval_ms,
        "eval_tokens": perf.n_eval,
    }
    return {
        "peer": "llama.cpp",
        "context": context,
        "new_tokens": new_tokens,
        **timing("llama.cpp", t0, times),
        "peak_rss_bytes": peak_rss(),
        "threads": threads,
        "n_batch": 512,
        "gguf": str(gguf),
        "repack": repack,
        "llama_perf": own,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
    }


def run_ort_genai(
    model_dir: Path, context: int, new_tokens: int, threads: int | None, tokenizer_json: Path
) -> dict[str, Any]:
    """ONNX Runtime GenAI's Generator: append_tokens runs the prefill (and computes the first
    logits); each generate_next_token picks a token (greedy) and runs the model on the previous one."""
    if not (Path(model_dir) / "genai_config.json").is_file():
        raise SystemExit(f"ort-genai peer: {model_dir} has no genai_config.json (the builder's output folder)")
    og = require("ort-genai")
    import os

    threads = threads or os.cpu_count() or 1
    config = og.Config(str(model_dir))
    session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    prompt = prompt_ids(tokenizer_json, context)

    def generate(ids: list[int], n: int) -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        times = []
        for _ in range(n):
            gen.generate_next_token()
            times.append(time.perf_counter())
        return t0, times

    generate(prompt[:8], 2)  # warm-up
    t0, times = generate(prompt, new_tokens)
    return {
        "peer": "ort-genai",
        "context": context,
        "new_tokens": new_tokens,
        **timing("ort-genai", t0, times),
        "peak_rss_bytes": peak_rss(),
        "threads": threads,
        "model_dir": str(model_dir),
        "onnxruntime_genai": getattr(og, "__version__", "?"),
    }


def run_ragtop_engine(
    export_dir: Path, context: int, new_tokens: int, threads: int | None, tokenizer_json: Path
) -> dict[str, Any]:
    """ragtop's LLMEngine in this process on an export: the served mode without HTTP."""
    from ragtop.runtime import (
        SERVED_DENSE_DECODE_TOKENS,
        SERVED_DENSE_PREFILL_TOKENS,
        EngineConfig,
        Request,
        SamplingParams,
        SchedulerConfig,
        load_model,
    )

    m = load_model(str(export_dir), threads=threads)
    prompt = prompt_ids(tokenizer_json, context)

    def generate(ids: list[int], n: int) -> tuple[float, list[float]]:
        e = m.engine(
            EngineConfig(
                SchedulerConfig(max_batch_size=1),
                context_limit=len(ids) + n + 16,
                prefix_caching=False,
                dense_prefill_tokens=SERVED_DENSE_PREFILL_TOKENS,  # as `ragtop serve` attends
                dense_decode_tokens=SERVED_DENSE_DECODE_TOKENS,
            )
        )
        t0 = time.perf_counter()
        e.add_request(Request("peer", ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
        times: list[float] = []
        while e.has_work():
            outs = e.step()
            now = time.perf_counter()
            times += [now] * sum(len(d.token_ids) for o in outs for d in o.deltas)
        return t0, times

    generate(prompt[:8], 2)  # warm-up
    t0, times = generate(prompt, new_tokens)
    return {
        "peer": "ragtop-engine",
        "context": context,
        "new_tokens": new_tokens,
        **timing("ragtop-engine", t0, times),
        "peak_rss_bytes": peak_rss(),
        "threads": threads,
        "export_dir": str(export_dir),
    }


def write_hf_folder(checkpoint: Path, out: Path, max_positions: int) -> Path:
    """A Hugging Face Llama folder (config, safetensors, tokenizer) holding a ragtop dense
    checkpoint's weights exactly (`to_hf_llama`), for tools that read only that format.
    `max_positions` raises max_position_embeddings (RoPE without scaling, as ragtop serves
    past the 8,192 tokens SmolLM2 declares) so a prompt of 8,192 tokens plus new tokens fits."""
    from ragtop.checkpoint import load_checkpoint
    from ragtop.runtime.bench import to_hf_llama

    ckpt = load_checkpoint(checkpoint)
    c = ckpt.model.config
    if c.attention.kind != "dense" or c.embedding.kind != "uniform":
        raise SystemExit(
            f"{checkpoint} is {c.attention.kind}/{c.embedding.kind}: only dense + uniform "
            "checkpoints have a Hugging Face Llama twin"
        )
    hf = to_hf_llama(ckpt.model)
    hf.config.max_position_embeddings = max(hf.config.max_position_embeddings, max_positions)
    gen = (
        json.loads((checkpoint / "generation_config.json").read_text())
        if (checkpoint / "generation_config.json").is_file()
        else {}
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(gen.get(key), int):
            setattr(hf.config, key, gen[key])
    hf.config.architectures = ["LlamaForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (checkpoint / name).is_file():
            (out / name).write_bytes((checkpoint / name).read_bytes())
    return out


def prepare_ort_genai(
    checkpoint: Path, out: Path, max_positions: int, log_path: Path | None = None, precision: str = "int4"
) -> Path:
    """ONNX Runtime GenAI's model, made by its own builder from the checkpoint's weights, offline;
    cached: a folder stamped with what it was built from is reused."""
    import shutil
    import subprocess
    import sys

    require("ort-genai")
    stamp = out / "loadtests.json"
    want = {"checkpoint": str(Path(checkpoint).resolve()), "max_positions": max_positions, "precision": precision}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (out / "genai_config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    hf_dir = out.with_name(out.name + "-hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    write_hf_folder(Path(checkpoint), hf_dir, max_positions)
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(out.with_name(out.name + "-cache")),
        "--extra_options",
        "prune_lm_head=true",
    ]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path or out.with_name(out.name + "-build.log"), "ab") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime-genai's builder failed ({rc}): {' '.join(cmd)}")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # ragtop's tokenizer, for the prompt ids
        if (hf_dir / name).is_file() and not (out / name).is_file():
            shutil.copy(hf_dir / name, out / name)
    stamp.write_text(json.dumps(want))
    return out


RUNNERS = {"llama.cpp": run_llama_cpp, "ort-genai": run_ort_genai, "ragtop-engine": run_ragtop_engine}


def add_arguments(sub) -> None:
    p = sub.add_parser("peer", help="one peer measurement in this process (used by context-sweep)")
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument(
        "path",
        type=Path,
        help="checkpoint (transformers), --ops standard export (stock-ort), .gguf file "
        "(llama.cpp), builder output (ort-genai) or export (ragtop-engine)",
    )
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--tokenizer", type=Path, help="tokenizer.json giving the prompt token ids (default: PATH/tokenizer.json)"
    )
    p.add_argument(
        "--no-repack",
        dest="repack",
        action="store_false",
        help="llama.cpp: its extra CPU buffer types off (weight repacking, AMX; the CLI's --no-repack)",
    )
    p.add_argument("--json", type=Path)
    p.set_defaults(func=run)


def tokenizer_for(a: argparse.Namespace) -> Path:
    """The tokenizer.json whose ids every system is fed; a clear error when there is none."""
    tok = a.tokenizer or (a.path / "tokenizer.json" if a.path.is_dir() else None)
    if tok is None or not tok.is_file():
        raise SystemExit(f"{a.kind} peer: no tokenizer.json ({tok or 'give --tokenizer for a .gguf path'})")
    return tok


def run(a: argparse.Namespace) -> int:
    if a.context < 1 or a.new_tokens < 2:
        raise SystemExit("peer: --context must be >= 1 and --new-tokens >= 2 (decode speed needs two tokens)")
    if a.kind == "transformers":
        r = run_transformers(a.path, a.context, a.new_tokens, a.threads)
    elif a.kind == "stock-ort":
        r = run_stock_ort(a.path, a.context, a.new_tokens, a.threads)
    else:
        extra = {"repack": a.repack} if a.kind == "llama.cpp" else {}
        try:
            r = RUNNERS[a.kind](a.path, a.context, a.new_tokens, a.threads, tokenizer_for(a), **extra)
        except PeerMissing as e:
            raise SystemExit(str(e)) from None
    text = json.dumps(r, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)
    return 0
