"""The verification cost v of self-speculative decoding: a 5-row forward (γ = 4 drafts + the
last token, attending densely, all 5 rows' logits: what engine.py's verify call runs) vs a
1-row dense forward, at a long context, for several exports.

    python scripts/verify_cost.py CONTEXT REPEATS EXPORT_DIR [EXPORT_DIR ...]

The cache is not prefilled: its first CONTEXT positions are filled with random keys and
values (seeded, the same for every export; block summaries the exact bounds of those keys),
which costs what a real cache costs to read. Each repeat runs every export in turn
(interleaved) and times, per export, median-of-5 calls of: the 1-row dense step, the 5-row
dense verification and the 1-row sparse step (the draft), one thread, the plugin loaded, in
CPU seconds of this process (`time.process_time`, less disturbed by other jobs than wall
time). Prints v = t(5 rows) / t(1 row dense), c = t(sparse) / t(1 row dense), and the
per-step times; medians over the repeats.
"""

import statistics
import sys
import time

import numpy as np

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner


def fill(runner: OrtRunner, context: int) -> None:
    rng = np.random.default_rng(0)
    bs = runner.block_size
    for (_, kind), buf in sorted(runner.buffers.items()):
        if kind in ("key", "value"):
            buf[:, :, :context] = rng.standard_normal(buf[:, :, :context].shape).astype(buf.dtype)
    for (layer, kind), buf in runner.buffers.items():
        if kind.startswith("key_m") and bs:
            keys = runner.buffers[layer, "key"][:, :, : context // bs * bs].astype(np.float32)
            blocks = keys.reshape(*keys.shape[:2], -1, bs, keys.shape[-1])
            bound = blocks.min(3) if kind == "key_min" else blocks.max(3)
            buf[:, :, : bound.shape[2]] = bound.astype(buf.dtype)


def cpu_seconds(runner: OrtRunner, chunk: Chunk, calls: int = 5) -> float:
    times = []
    for _ in range(calls):
        t = time.process_time()
        runner.forward([chunk])
        times.append(time.process_time() - t)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    context, repeats, folders = int(argv[0]), int(argv[1]), argv[2:]
    runners = []
    for f in folders:
        r = OrtRunner.from_folder(f, threads=1)
        r.allocate(1, context + 64)
        fill(r, context)
        runners.append(r)
    cases = {
        "dense 1 row": Chunk(0, [1], context, "last", dense=True),
        "verify 5 rows": Chunk(0, [1, 2, 3, 4, 5], context, "all", dense=True),
        "sparse 1 row": Chunk(0, [1], context, "last"),
    }
    for r in runners:  # warm-up
        for c in cases.values():
            r.forward([c])
    results = {(f, name): [] for f in folders for name in cases}
    for _ in range(repeats):
        for f, r in zip(folders, runners, strict=True):
            for name, c in cases.items():
                results[f, name].append(cpu_seconds(r, c))
    print(f"context {context}, one thread, CPU ms per forward (median of {repeats} repeats x median of 5 calls)\n")
    print("| export | dense 1 row | verify 5 rows | sparse 1 row | v = verify / dense | c = sparse / dense |")
    print("|---|---|---|---|---|---|")
    for f in folders:
        t = {name: statistics.median(results[f, name]) * 1e3 for name in cases}
        v, c = t["verify 5 rows"] / t["dense 1 row"], t["sparse 1 row"] / t["dense 1 row"]
        print(
            f"| {f} | {t['dense 1 row']:.1f} | {t['verify 5 rows']:.1f} | {t['sparse 1 row']:.1f} | "
            f"**{v:.2f}** | {c:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
