"""Decode speed of several exports per CPU-second, for a machine that other jobs keep busy.

    python scripts/decode_cpu_time.py PROMPT_TOKENS DECODE_STEPS REPEATS EXPORT_DIR [EXPORT_DIR ...]

Each repeat, every export in turn (interleaved): prefill a PROMPT_TOKENS-token prompt in
256-token chunks, then DECODE_STEPS greedy steps through a bare OrtRunner loop (one thread,
the plugin loaded, numpy argmax). Decode is counted in tokens per CPU-second of this process
(`time.process_time`): on a shared machine wall time mostly measures the other jobs, while a
one-thread process's CPU time is disturbed far less (cache sharing still counts: compare
ratios). Prefill is reported in wall seconds and in CPU seconds of this process. Medians over
the repeats; ratios vs the first.
"""

import statistics
import sys
import time

import numpy as np

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner


def one_run(runner: OrtRunner, prompt: list[int], steps: int) -> tuple[float, float, float]:
    """(prefill wall seconds, decode tokens per CPU-second, prefill CPU seconds)."""
    runner.allocate(1, len(prompt) + steps + 64)
    t0, p0 = time.perf_counter(), time.process_time()
    for s in range(0, len(prompt), 256):
        logits = runner.forward([Chunk(0, prompt[s : s + 256], s, "last")])[0]
    prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - p0
    tok, pos = int(np.argmax(logits)), len(prompt)
    c0 = time.process_time()
    for _ in range(steps):
        logits = runner.forward([Chunk(0, [tok], pos, "last")])[0]
        tok, pos = int(np.argmax(logits)), pos + 1
    return prefill, steps / (time.process_time() - c0), prefill_cpu


def main(argv: list[str]) -> None:
    length, steps, repeats, folders = int(argv[0]), int(argv[1]), int(argv[2]), argv[3:]
    runners = {f: OrtRunner(f, threads=1) for f in folders}
    prompt = np.random.default_rng(0).integers(100, 20000, length).tolist()
    decode: dict[str, list[float]] = {f: [] for f in folders}
    prefill: dict[str, list[float]] = {f: [] for f in folders}
    prefill_cpu: dict[str, list[float]] = {f: [] for f in folders}
    for _ in range(repeats):
        for f, r in runners.items():
            p, d, pc = one_run(r, prompt, steps)
            prefill[f].append(p)
            prefill_cpu[f].append(pc)
            decode[f].append(d)
    base = statistics.median(decode[folders[0]])
    for f in folders:
        m = statistics.median(decode[f])
        print(
            f"{f}: decode {m:.2f} tokens/CPU-s ({m / base:.2f}x the first) {[round(x, 1) for x in decode[f]]}, "
            f"prefill {statistics.median(prefill[f]):.2f} s (wall), {statistics.median(prefill_cpu[f]):.2f} CPU-s"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
