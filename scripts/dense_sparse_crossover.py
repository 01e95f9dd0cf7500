"""Where sparse attention starts to pay: decode and prefill of one export with and without
the attention_dense flag, at growing contexts, in one process.

    python scripts/dense_sparse_crossover.py EXPORT_DIR [--threads 2] [--contexts 1024,2048,4096,8192]

EXPORT_DIR: a block-selection export with the attention_dense input (the served model's
folder under ~/.cache/ragtop/models). The prompt is random token ids. For each context:
the prompt prefilled in 256-token chunks densely, then (up to 8,192 tokens) sparsely (wall
seconds; the sparse one is kept), then one decode step dense and one sparse, interleaved,
best of 4 in each of 3 rounds (wall ms; with --threads 1, CPU time instead).
"""

import argparse
import time
from pathlib import Path

import numpy as np

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", default="1024,2048,4096,6144,8192,12288")
    a = p.parse_args()
    contexts = [int(x) for x in a.contexts.split(",")]
    clock = time.process_time if a.threads == 1 else time.perf_counter
    r = OrtRunner(a.export, a.threads)
    if not r.dense_flag:
        raise SystemExit(f"{a.export}: no attention_dense input (export a block-selection graph)")
    ids = np.random.default_rng(0).integers(100, 20000, max(contexts) + 8).tolist()
    r.allocate(1, max(contexts) + 64)
    print("| context | decode dense | decode sparse | sparse ÷ dense speed | prefill dense | prefill sparse |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in contexts:
        prefill = {}
        for dense in (True, False) if n <= 8192 else (True,):
            r.rollback(0, 0, n)
            t = clock()
            for s in range(0, n, 256):
                r.forward([Chunk(0, ids[s : min(n, s + 256)], s, "last", dense=dense)])
            prefill[dense] = clock() - t

        def step(dense: bool, n: int = n) -> float:
            t = clock()
            r.forward([Chunk(0, ids[n : n + 1], n, "last", dense=dense)])
            r.rollback(0, n, n)
            return clock() - t

        best = {True: float("inf"), False: float("inf")}
        for _round in range(3):
            for dense in (True, False):
                best[dense] = min(best[dense], *(step(dense) for _ in range(4)))
        sparse_pre = f"{prefill[False]:.1f} s" if False in prefill else "–"
        print(
            f"| {n:,} | {best[True] * 1e3:.1f} ms | {best[False] * 1e3:.1f} ms | {best[True] / best[False]:.2f}× "
            f"| {prefill[True]:.1f} s | {sparse_pre} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
