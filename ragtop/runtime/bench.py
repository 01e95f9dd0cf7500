"""`ragtop bench engine`: decode and prompt throughput of the runners on the same weights.

Measured in one run, on the same prompts:
- single-stream decode tokens/s (best of REPEATS runs): OrtRunner, TorchRunner (through the engine) and transformers'
  `generate` (eager attention, greedy, KV cache) on a LlamaForCausalLM holding the same weights
  (dense + uniform models only: other variants have no transformers twin);
- aggregate output tokens/s with 1, 4 and 16 concurrent streams (prefill included);
- prompt throughput: prompt tokens/s of one long prompt (time to first token).
Ratios are computed from these same numbers. transformers is imported here only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RagtopError
from ..model import Transformer
from .engine import SERVED_DENSE_DECODE_TOKENS, SERVED_DENSE_PREFILL_TOKENS, EngineConfig, LLMEngine, Request
from .loader import LoadedModel, load_model
from .sampling import SamplingParams
from .scheduler import SchedulerConfig
from .stats import IterationStats

TEXT = (
    "We hold these truths to be self-evident, that all men are created equal, that they are "
    "endowed by their Creator with certain unalienable Rights, that among these are Life, "
    "Liberty and the pursuit of Happiness. "
)


REPEATS = 3  # single-stream figures are the best of this many runs (the machine may be shared)


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: Path
    onnx: Path | None = None
    prompt_tokens: int = 64
    new_tokens: int = 64
    streams: tuple[int, ...] = (1, 4, 16)
    long_prompt: int = 512
    threads: int | None = None


def prompt_ids(model: LoadedModel, n: int, shift: int = 0) -> list[int]:
    """n tokens of English text (a different window per `shift`)."""
    ids = model.tokenizer.encode(TEXT * (2 + (n + shift) // 20), add_special_tokens=False).ids
    if len(ids) < n + shift:
        raise RagtopError(f"could not build a {n}-token prompt")
    return ids[shift : shift + n]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def make_engine(model: LoadedModel, cfg: BenchConfig) -> LLMEngine:
    streams = max(cfg.streams)
    limit = min(model.runner.spec.max_model_len, max(cfg.prompt_tokens + cfg.new_tokens, cfg.long_prompt + 1))
    sched = SchedulerConfig(
        max_batch_size=streams, max_tokens_per_step=max(512, streams), prefill_chunk=512, max_waiting=streams
    )
    return model.engine(
        EngineConfig(
            sched,
            context_limit=limit,
            dense_prefill_tokens=SERVED_DENSE_PREFILL_TOKENS,  # attends as `ragtop serve` does
            dense_decode_tokens=SERVED_DENSE_DECODE_TOKENS,
        )
    )


def single_stream_decode(engine: LLMEngine, prompt: list[int], n: int) -> float:
    """Decode tokens/s of one stream: tokens after the first over the time after it."""
    engine.add_request(Request("single", prompt, greedy(n)))
    times = []
    while engine.has_work():
        for o in engine.step():
            times += [time.perf_counter()] * sum(len(d.token_ids) for d in o.deltas)
    return (len(times) - 1) / (times[-1] - times[0])


def aggregate(engine: LLMEngine, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """Output tokens/s of len(prompts) concurrent streams: from submission to the last token
    (prefill included), and over the steps that only decoded."""
    steps: list[IterationStats] = []
    engine.stats_listeners.append(steps.append)
    t0 = time.perf_counter()
    out = engine.run_until_done([Request(f"s{i}", p, greedy(n)) for i, p in enumerate(prompts)])
    total = time.perf_counter() - t0
    engine.stats_listeners.remove(steps.append)
    tokens = sum(len(d.token_ids) for outs in out.values() for o in outs for d in o.deltas)
    decode = [s for s in steps if s.prompt_tokens == 0]
    decode_s = sum(s.decode_time_s + s.sample_time_s for s in decode)
    return tokens / total, sum(s.generation_tokens for s in decode) / decode_s


def prompt_throughput(engine: LLMEngine, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    engine.run_until_done([Request("long", prompt, greedy(1))])
    return len(prompt) / (time.perf_counter() - t0)


def bench_runner(model: LoadedModel, cfg: BenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    engine = make_engine(model, cfg)
    prompt = prompt_ids(model, cfg.prompt_tokens)
    single_stream_decode(engine, prompt, 8)  # warm-up
    best = max(single_stream_decode(engine, prompt, cfg.new_tokens) for _ in range(REPEATS))
    r: dict[str, Any] = {"single_stream_decode_tps": best}
    if hasattr(model.runner, "plugin"):
        r["plugin"] = bool(model.runner.plugin)  # ragtop kernels (True) or standard-op fallbacks
    progress(f"  {model.runner.spec.name}: single stream {r['single_stream_decode_tps']:.1f} tok/s")
    r["aggregate_tps"], r["aggregate_decode_tps"] = {}, {}
    for k in cfg.streams:
        prompts = [prompt_ids(model, cfg.prompt_tokens, i) for i in range(k)]
        r["aggregate_tps"][str(k)], r["aggregate_decode_tps"][str(k)] = aggregate(engine, prompts, cfg.new_tokens)
        progress(
            f"  {model.runner.spec.name}: {k} streams {r['aggregate_tps'][str(k)]:.1f} tok/s "
            f"({r['aggregate_decode_tps'][str(k)]:.1f} tok/s in decode-only steps)"
        )
    r["prompt_tps"] = prompt_throughput(engine, prompt_ids(model, cfg.long_prompt))
    progress(f"  {model.runner.spec.name}: prompt {r['prompt_tps']:.1f} tok/s")
    return r


def to_hf_llama(model: Transformer):
    """A transformers LlamaForCausalLM with the same weights (dense attention, uniform embeddings):
    the peer of `ragtop bench engine`, and the reference of the parity tests (tests/model,
    tests/convert)."""
    import transformers

    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(layer.attn, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = getattr(layer.mlp, n).weight
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
    sd["lm_head.weight"] = model.embed.weight if c.tie_embeddings else model.lm_head.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]  # buffers transformers computes itself
    if unexpected or missing:
        raise RagtopError(
            f"the transformers Llama does not match the model: missing {missing}, unexpected {unexpected}"
        )
    return hf


@torch.inference_mode()
def hf_single_stream_decode(model: Transformer, prompt: list[int], n: int) -> float:
    hf = to_hf_llama(model)
    ids = torch.tensor([prompt])

    def run(k: int) -> float:
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt) + k
        return time.perf_counter() - t0

    run(8)  # warm-up
    first = min(run(1) for _ in range(REPEATS))  # prefill + first token
    return (n - 1) / (min(run(n) for _ in range(REPEATS)) - first)


def bench_engine(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda _: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report: dict[str, Any] = {
        "checkpoint": str(cfg.checkpoint),
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
        "threads": torch.get_num_threads(),
        "runners": {},
        "notes": [],
    }
    ckpt = load_model(cfg.checkpoint, "torch")
    report["attention"] = ckpt.runner.spec.attention
    model: Transformer = ckpt.runner.model  # type: ignore[attr-defined]
    report["parameters"] = model.parameter_counts()["total"]
    ort = open_ort(cfg, report["notes"], say)
    for loaded in ([ort] if ort is not None else []) + [ckpt]:
        say(f"benchmarking {loaded.runner.spec.name} ...")
        report["runners"][loaded.runner.spec.name] = bench_runner(loaded, cfg, say)
    c = model.config
    if c.attention.kind == "dense" and c.embedding.kind == "uniform":
        try:
            say("benchmarking transformers generate ...")
            tps = hf_single_stream_decode(model, prompt_ids(ckpt, cfg.prompt_tokens), cfg.new_tokens)
            report["runners"]["transformers"] = {"single_stream_decode_tps": tps}
        except ImportError:
            report["notes"].append("transformers is not installed: no transformers baseline")
    else:
        report["notes"].append(f"{report['attention']} / {c.embedding.kind} model: transformers has no twin of it")
    report["ratios"] = ratios(report["runners"], cfg.streams)
    return report


def open_ort(cfg: BenchConfig, notes: list[str], say: Callable[[str], None]) -> LoadedModel | None:
    try:
        from .runners.onnxruntime import OrtRunner  # noqa: F401
    except ImportError:
        notes.append("OrtRunner is not available in this build: onnxruntime runner not benchmarked")
        return None
    if cfg.onnx is None:
        notes.append("no --onnx folder given: onnxruntime runner not benchmarked")
        return None
    return load_model(cfg.onnx, "ort", threads=cfg.threads)


def ratios(runners: dict[str, dict[str, Any]], streams: tuple[int, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    hf = runners.get("transformers", {}).get("single_stream_decode_tps")
    for name, r in runners.items():
        if hf and name != "transformers":
            out[f"{name}_vs_transformers_single_stream"] = r["single_stream_decode_tps"] / hf
        top = str(max(streams))
        for key, label in (("aggregate_tps", ""), ("aggregate_decode_tps", "_decode_only")):
            agg = r.get(key, {})
            if "1" in agg and top in agg and max(streams) > 1:
                out[f"{name}_{top}_streams_vs_1{label}"] = agg[top] / agg["1"]
    return out


def format_report(report: dict[str, Any]) -> str:
    streams = sorted({int(k) for r in report["runners"].values() for k in r.get("aggregate_tps", {})})
    head = (
        f"{'runner':<19} {'1-stream decode':>19}"
        + "".join(f" {f'{k} streams':>11}" for k in streams)
        + f" {'prompt tok/s':>13}"
    )
    lines = [
        f"checkpoint {report['checkpoint']} ({report['parameters']:,} parameters, {report['attention']} attention), "
        f"prompt {report['prompt_tokens']} + {report['new_tokens']} new tokens, {report['threads']} threads; output "
        "tokens/s",
        head,
    ]
    for name, r in report["runners"].items():
        agg = r.get("aggregate_tps", {})
        cells = "".join(f" {agg[str(k)]:>11.1f}" if str(k) in agg else f" {'-':>11}" for k in streams)
        prompt = f"{r['prompt_tps']:>13.1f}" if "prompt_tps" in r else f"{'-':>13}"
        label = f"{name}{' +plugin' if r.get('plugin') else ''}"
        lines.append(f"{label:<19} {r['single_stream_decode_tps']:>19.1f}{cells} {prompt}")
        dec = r.get("aggregate_decode_tps", {})
        if dec:
            cells = "".join(f" {dec[str(k)]:>11.1f}" if str(k) in dec else f" {'-':>11}" for k in streams)
            lines.append(f"{'  decode-only':<19} {'':>19}{cells}")
    lines += [f"{k}: {v:.2f}x" for k, v in report["ratios"].items()]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


# -- command line (`ragtop bench engine`) ---------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a checkpoint (e.g. from `ragtop import smollm2 --out DIR`)")
    p.add_argument("--onnx", type=Path, default=None, help="the same checkpoint exported (`ragtop export`)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--streams", default="1,4,16", help="concurrent streams to measure (default 1,4,16)")
    p.add_argument("--long-prompt", type=int, default=512, help="prompt length for prompt throughput")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    p.add_argument("--json", action="store_true")


def run(a: argparse.Namespace) -> int:
    try:
        streams = tuple(int(s) for s in a.streams.split(","))
    except ValueError:
        raise RagtopError(f"--streams must be comma-separated integers, got {a.streams!r}") from None
    for name, value in (
        ("--prompt-tokens", a.prompt_tokens),
        ("--new-tokens", a.new_tokens),
        ("--long-prompt", a.long_prompt),
        ("--streams", min(streams)),
    ):
        if value < 1 or (name == "--new-tokens" and value < 2):
            raise RagtopError(f"{name} must be >= {2 if name == '--new-tokens' else 1}, got {value}")
    cfg = BenchConfig(a.checkpoint, a.onnx, a.prompt_tokens, a.new_tokens, streams, a.long_prompt, a.threads)
    report = bench_engine(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if a.json else format_report(report))
    return 0
