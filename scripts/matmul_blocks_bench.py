"""ragtop::MatMulBlocks (the plugin kernel) vs the subgraph it replaces (com.microsoft::MatMulNBits
+ the per-block minimum term), one node, per call, at the SmolLM2 export's shapes.

    python scripts/matmul_blocks_bench.py [--threads 1] [--level 4] [--rows 1,2,5,8,16,64,256]

Random Q4_1-like blocks (4-bit codes, scale, minimum) for the linear layers and Q8_0-like
8-bit blocks for the tied head. Times are onnxruntime's own kernel times (its profiler),
summed over the graph's nodes per Run() (MatMulNBits and the four minima nodes vs the one
MatMulBlocks node; Python's and Run()'s fixed overhead, the same for both, left out), the
median over --repeats rounds that alternate the two sessions (a slow spell of the machine
hits both). Also checks that the two agree. Prints a markdown table of microseconds per
call, standard / plugin, and their ratio (> 1: the plugin is faster).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ragtop.bench.graphs import matmul_blocks_model
from ragtop.quant import QBlocks

# (name, K, N, bits, mins): SmolLM2-135M's stacked projections and the tied 8-bit head
SHAPES = [
    ("qkv 576x960", 576, 960, 4, True),
    ("o 576x576", 576, 576, 4, True),
    ("gate+up 576x3072", 576, 3072, 4, True),
    ("down 1536x576", 1536, 576, 4, True),
    ("head 576x49152 (8-bit)", 576, 49152, 8, False),
]
PLUGIN = Path(__file__).resolve().parent.parent / "ragtop" / "_native" / "libragtop_ort.so"


def node_model(K: int, N: int, bits: int, mins: bool, level: int, custom: bool, seed: int = 0) -> bytes:
    """Random blocks of the given form; custom: the MatMulBlocks node, else its body inlined."""
    rng = np.random.default_rng(seed)
    nb = -(-K // 32)
    codes = rng.integers(0, 1 << bits, size=(N, nb * 32)).astype(np.uint8)
    scales = (rng.random((N, nb), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    m = (rng.standard_normal((N, nb)) * 0.02).astype(np.float32) if mins else None
    return matmul_blocks_model(QBlocks(bits, codes, scales, None, m), K, level, standard=not custom)


def session(model: bytes, threads: int, plugin: bool, profile: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = profile
    if plugin:
        so.register_custom_ops_library(str(PLUGIN))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def wall_us(s: ort.InferenceSession, a: np.ndarray, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        s.run(None, {"A": a})
    return (time.perf_counter() - t) / calls * 1e6


def kernel_us(s: ort.InferenceSession, a: np.ndarray, calls: int) -> list[float]:
    """Per Run(), the summed kernel time of the graph's nodes (onnxruntime's profiler), as a list."""
    for _ in range(calls):
        s.run(None, {"A": a})
    path = s.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink()
    runs, cur = [], 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            cur += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(cur)
            cur = 0.0
    return runs[-calls:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--level", type=int, default=4)
    p.add_argument("--rows", default="1,2,5,8,16,64,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--timer",
        choices=["kernel", "wall"],
        default="kernel",
        help="kernel: onnxruntime's profiler (one thread only: with more it reports the plugin kernel's "
        "per-thread share); wall: wall time per Run(), the fixed overhead of Run() included for both",
    )
    p.add_argument("--shapes", default="", help="comma-separated substrings of the shape names (default: all)")
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    shapes = [s for s in SHAPES if not a.shapes or any(k in s[0] for k in a.shapes.split(","))]
    print(
        f"threads {a.threads}, accuracy level {a.level}, {a.timer} time; us per call, "
        "standard (MatMulNBits + minima) / plugin (MatMulBlocks); ratio > 1: the plugin is faster\n"
    )
    print("| matrix | " + " | ".join(f"M={m}" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    rng = np.random.default_rng(1)
    for name, K, N, bits, mins in shapes:
        models = (
            node_model(K, N, bits, mins, a.level, custom=False),
            node_model(K, N, bits, mins, a.level, custom=True),
        )
        cells = []
        for M in rows:
            x = rng.standard_normal((M, K)).astype(np.float32)
            calls = max(5, min(200, int(3e7 / (K * N * M + 1e5))))
            ks: list[list[float]] = [[], []]
            for _ in range(a.repeats):  # interleaved: a slow spell hits both
                for i, plugin in enumerate((False, True)):
                    s = session(models[i], a.threads, plugin, profile=a.timer == "kernel")
                    s.run(None, {"A": x})
                    ks[i] += kernel_us(s, x, calls) if a.timer == "kernel" else [wall_us(s, x, calls)]
            ys = session(models[0], a.threads, False).run(None, {"A": x})[0]
            yp = session(models[1], a.threads, True).run(None, {"A": x})[0]
            err = float(np.abs(ys - yp).max() / max(np.abs(ys).max(), 1e-30))
            std, plg = float(np.median(ks[0])), float(np.median(ks[1]))
            cells.append(f"{std:.0f} / {plg:.0f} = **{std / plg:.2f}x**" + (f" (err {err:.1e})" if err > 1e-4 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
