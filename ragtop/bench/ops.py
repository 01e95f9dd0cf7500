"""`ragtop bench ops`: one attention layer, four implementations, timed in one run.

Paths (all in onnxruntime on the CPU provider, KV cache preallocated and shared between
past and present through IO binding, so no path pays for a cache copy):

  dense_gqa      com.microsoft GroupQueryAttention (onnxruntime's fused dense kernel)
  dense_ops      dense attention in standard ops (MatMul, Where, Softmax, MatMul: MLAS GEMMs),
                 prefill in 512-token chunks like the fallback;
                 measured too because GroupQueryAttention's decode time jumps ~10x between
                 12k and 16k tokens on this machine (onnxruntime 1.32), see docs/kernels.md
  plugin_exact   ragtop::TopKAttention from the plugin library, exact top-k
  plugin_block   the same with block selection (min/max key summaries per block)
  fallback       exact top-k attention in standard ONNX ops (MatMul, Where, TopK, Softmax);
                 prefill runs it in 512-token chunks (one call would hold a T x T matrix)

Cases: one decode step at cache lengths 1k, 8k, 32k; prefill of 2k and 8k tokens.
Figures are medians of repeated runs; `speedup_vs_dense` = time of the faster dense path
(dense_gqa or dense_ops, per case) / path time. Decode
steps rotate over several copies of the cache (>= 96 MiB in all, like the layers of a
model) so the cache is read from memory, not from the CPU's last-level cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SHAPES = {  # name: (query heads, KV heads, head dim)
    "small": (8, 8, 32),  # ragtop's `small` preset attention shape (notes' dense baseline)
    "smollm2": (9, 3, 64),  # SmolLM2-135M: grouped-query attention
}
PATHS = ("dense_gqa", "dense_ops", "plugin_exact", "plugin_block", "fallback")
FALLBACK_CHUNK = 512
LLC_SPAN = 96 << 20  # decode rotates over buffer sets totalling >= this (3x a 32 MiB L3)


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "smollm2"])
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument(
        "--topk", type=int, default=32, help="keys kept per query (default: the small top-k models' 32)"
    )
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--block-budget", type=int, default=16, help="earlier blocks kept per query besides its own")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime intra-op threads")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per decode measurement")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _timeit(fn: Callable[[], None], seconds: float, min_reps: int, warmup: int = 2) -> float:
    """Median wall time of fn in milliseconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < seconds and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class _Runner:
    """One session; `sets` copies of the cache buffers, each bound as both past and present.

    Each call runs on the next buffer set, round robin: with enough sets their total size
    exceeds the last-level cache, as the caches of a model's many layers do, so a decode
    step reads its KV cache from memory instead of timing a cache-resident toy.
    """

    def __init__(self, ort, model: bytes, threads: int, plugin: bool, feeds: dict, shared: dict, sets: int = 1):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if plugin:
            from ragtop.runtime.plugin import register_plugin

            if not register_plugin(so):
                raise RuntimeError("the plugin library is not built: run `make install`")
        self.ort, self.sess = ort, ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.shared = [
            {name: ort.OrtValue.ortvalue_from_numpy(a.copy()) for name, a in shared.items()} for _ in range(sets)
        ]
        self.bindings = [self.bind(feeds, bufs) for bufs in self.shared]
        self.next = 0

    def bind(self, feeds: dict, bufs: dict):
        io = self.sess.io_binding()
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        io.bind_output("output")
        for name, val in bufs.items():
            io.bind_ortvalue_input(name, val)
            io.bind_ortvalue_output(name.replace("past", "present"), val)
        return io

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.bindings[self.next])
        self.next = (self.next + 1) % len(self.bindings)


def _summaries(keys: np.ndarray, length: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    B, Hkv, C, Dh = keys.shape
    lo = np.zeros((B, Hkv, C // bs, Dh), np.float32)
    hi = np.zeros_like(lo)
    for blk in range(-(-length // bs)):
        rows = keys[:, :, blk * bs : min((blk + 1) * bs, length)]
        lo[:, :, blk], hi[:, :, blk] = rows.min(2), rows.max(2)
    return lo, hi


def _standard_ops(
    ort, model: bytes, args, kind: str, base: dict, lens, keys, vals, sets: int, seconds: float, reps: int, warm: int
) -> float:
    """Times a standard-op graph: one call for decode; prefill in FALLBACK_CHUNK-token calls
    (one call would hold T x T scores per head: 2 GB at 8k tokens and 8 heads)."""
    if kind == "decode":
        r = _Runner(
            ort,
            model,
            args.threads,
            False,
            {**base, "past_lengths": lens},
            {"past_key": keys, "past_value": vals},
            sets,
        )
        return _timeit(r, seconds, reps, warm)
    r = _Runner(ort, model, args.threads, False, {}, {"past_key": keys, "past_value": vals})
    S = base["query"].shape[1]
    chunks = []
    for s0 in range(0, S, FALLBACK_CHUNK):
        feeds = {name: x[:, s0 : s0 + FALLBACK_CHUNK] for name, x in base.items()}
        chunks.append(r.bind({**feeds, "past_lengths": np.array([s0], np.int64)}, r.shared[0]))

    def run_all() -> None:
        for io in chunks:
            r.sess.run_with_iobinding(io)

    return _timeit(run_all, 0.0, 2, 1)


def _case(ort, shape: Shape, args, kind: str, length: int, rng: np.random.Generator) -> dict[str, float]:
    """Times every path for one case: decode at cache length `length`, or prefill of `length`."""
    from ragtop.bench.graphs import fallback_attention_model, gqa_model, topk_attention_model

    H, Hkv, Dh = shape.heads, shape.kv_heads, shape.head_dim
    C = length
    S = 1 if kind == "decode" else length
    past = length - 1 if kind == "decode" else 0
    q = rng.standard_normal((1, S, H * Dh), dtype=np.float32)
    k = rng.standard_normal((1, S, Hkv * Dh), dtype=np.float32)
    v = rng.standard_normal((1, S, Hkv * Dh), dtype=np.float32)
    keys = rng.standard_normal((1, Hkv, C, Dh), dtype=np.float32)
    vals = rng.standard_normal((1, Hkv, C, Dh), dtype=np.float32)
    lens = np.array([past], np.int64)
    reps, seconds = (10, args.seconds) if kind == "decode" else (3, 0.0)
    warm = 2 if kind == "decode" else 1
    ms: dict[str, float] = {}
    base = dict(query=q, key=k, value=v)
    set_bytes = 2 * keys.nbytes
    sets = min(32, max(2, -(-LLC_SPAN // set_bytes))) if kind == "decode" else 1

    gqa = _Runner(
        ort,
        gqa_model(H, Hkv, Dh),
        args.threads,
        False,
        {
            **base,
            "seqlens_k": np.array([past + S - 1], np.int32),
            "total_sequence_length": np.array(past + S, np.int32),
        },
        {"past_key": keys, "past_value": vals},
        sets,
    )
    ms["dense_gqa"] = _timeit(gqa, seconds, reps, warm)
    del gqa

    ms["dense_ops"] = _standard_ops(
        ort,
        fallback_attention_model(H, Hkv, Dh, None, C),
        args,
        kind,
        base,
        lens,
        keys,
        vals,
        sets,
        seconds,
        reps,
        warm,
    )

    exact = _Runner(
        ort,
        topk_attention_model(H, Hkv, Dh, args.topk),
        args.threads,
        True,
        {**base, "past_lengths": lens},
        {"past_key": keys, "past_value": vals},
        sets,
    )
    ms["plugin_exact"] = _timeit(exact, seconds, reps, warm)
    del exact

    lo, hi = _summaries(keys, past, args.block_size)
    block = _Runner(
        ort,
        topk_attention_model(H, Hkv, Dh, args.topk, args.block_size, args.block_budget),
        args.threads,
        True,
        {**base, "past_lengths": lens},
        {"past_key": keys, "past_value": vals, "past_key_min": lo, "past_key_max": hi},
        sets,
    )
    ms["plugin_block"] = _timeit(block, seconds, reps, warm)
    del block

    ms["fallback"] = _standard_ops(
        ort,
        fallback_attention_model(H, Hkv, Dh, args.topk, C),
        args,
        kind,
        base,
        lens,
        keys,
        vals,
        sets,
        seconds,
        reps,
        warm,
    )
    return ms


def run(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    results = []
    for name in args.shapes:
        shape = Shape(name, *SHAPES[name])
        cases = [("decode", n) for n in args.decode_lengths] + [("prefill", n) for n in args.prefill_lengths]
        for kind, n in cases:
            ms = _case(ort, shape, args, kind, n, rng)
            dense = min(ms["dense_gqa"], ms["dense_ops"])
            results.append(
                {
                    "shape": name,
                    "heads": shape.heads,
                    "kv_heads": shape.kv_heads,
                    "head_dim": shape.head_dim,
                    "case": kind,
                    "length": n,
                    "ms": {p: round(ms[p], 4) for p in PATHS},
                    "speedup_vs_dense": {p: round(dense / ms[p], 3) for p in PATHS},
                }
            )
            if not args.json:
                print(_row(results[-1]), flush=True)
    report = {
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "topk": args.topk,
        "block_size": args.block_size,
        "block_budget": args.block_budget,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"onnxruntime {ort.__version__}, {args.threads} threads, topk={args.topk}, "
            f"block_size={args.block_size}, block_budget={args.block_budget}, "
            f"load average {report['load_average_1m']} (other work on the machine adds noise)"
        )
    return 0


def _row(r: dict) -> str:
    parts = [f"{r['shape']:8s} {r['case']:7s} {r['length']:6d}"]
    for p in PATHS:
        parts.append(f"{p} {r['ms'][p]:9.3f} ms ({r['speedup_vs_dense'][p]:5.2f}x)")
    return "  ".join(parts)
