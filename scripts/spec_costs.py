"""The parts of self-speculative decoding's speed, measured one by one on a prefilled cache.

    python scripts/spec_costs.py EXPORT_DIR PROMPT_TOKENS [--gamma 4] [--tokens 64] [--repeats 5]
        [--data DIR] [--threads 1]

One export (a block-selection graph with the attention_dense input), one thread, the plugin
loaded, a bare OrtRunner (no engine). The prompt is the first PROMPT_TOKENS tokens of a
held-out State of the Union speech (RAGTOP_DATA_DIR or --data), prefilled densely (as the
lossless mode does). Then, interleaved, best of --repeats (CPU seconds of this process):

- d: one dense decode step (the baseline the lossless mode must beat);
- s: one sparse decode step (a draft step), c = s / d;
- v: one dense forward of gamma + 1 tokens (a verification), in units of d.

And the acceptance: the dense model's greedy continuation of --tokens tokens, then every
position of it teacher-forced through the sparse graph in one chunk; alpha = the share of
positions where the sparse argmax equals the dense one (per-draft acceptance, taken as
independent). The cost model of docs/benchmarks.md then gives the speedup over dense decode
for each gamma: E / (gamma * c + v(gamma)), E = (1 - alpha^(gamma+1)) / (1 - alpha), with v
measured at every gamma up to --gamma.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner


def prompt_ids(folder: Path, data: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    from ragtop.train.corpus import load_sotu, split_by_year

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    _, held = split_by_year(load_sotu(data))
    for d in held:
        ids = tok.encode(d.text).ids
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"no held-out speech has {n} tokens")


def cpu(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("prompt_tokens", type=int)
    p.add_argument("--gamma", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("RAGTOP_DATA_DIR", "data")))
    a = p.parse_args()

    ids = prompt_ids(a.export, a.data, a.prompt_tokens)
    r = OrtRunner(a.export, a.threads)
    if not r.dense_flag:
        raise SystemExit(f"{a.export}: no attention_dense input (export a block-selection graph)")
    n = len(ids)
    r.allocate(1, n + a.tokens + a.gamma + 64)
    t0 = time.perf_counter()
    for s in range(0, n, 256):
        (logits,) = r.forward([Chunk(0, ids[s : s + 256], s, "last", dense=True)])
    print(f"{a.export.name}: {n}-token prompt prefilled densely in {time.perf_counter() - t0:.1f} s", flush=True)

    # dense greedy continuation, then the same positions teacher-forced through the sparse graph
    cont, pos = [], n
    for _ in range(a.tokens):
        nxt = int(np.argmax(logits))
        cont.append(nxt)
        (logits,) = r.forward([Chunk(0, [nxt], pos, "last", dense=True)])
        pos += 1
    r.rollback(0, n, n)
    (sparse_logits,) = r.forward([Chunk(0, cont[:-1], n, "all")])
    agree = np.argmax(sparse_logits, axis=-1) == np.asarray(cont[1:])
    alpha = float(agree.mean())
    r.rollback(0, n, n)
    print(
        f"acceptance: sparse argmax = dense on {int(agree.sum())} of {len(agree)} positions: alpha = {alpha:.3f}",
        flush=True,
    )

    def step(tokens: int, dense: bool):
        def run():
            r.forward([Chunk(0, cont[:tokens], n, "last", dense=dense)])
            r.rollback(0, n, n)

        return run

    cost = {"d": [], "s": [], **{f"v{g}": [] for g in range(1, a.gamma + 1)}}
    for _ in range(3):  # interleaved rounds; best of `repeats` within each
        cost["d"].append(cpu(step(1, True), a.repeats))
        cost["s"].append(cpu(step(1, False), a.repeats))
        for g in range(1, a.gamma + 1):
            cost[f"v{g}"].append(cpu(step(g + 1, True), a.repeats))
    d = min(cost["d"])
    c = min(cost["s"]) / d
    print(
        f"dense step {d * 1e3:.1f} ms, sparse step {min(cost['s']) * 1e3:.1f} ms: c = {c:.3f}"
        f" (sparse decodes {1 / c:.2f}x dense)"
    )
    print("| gamma | v (dense steps) | E tokens per round | speedup over dense |")
    print("|---|---|---|---|")
    for g in range(1, a.gamma + 1):
        v = min(cost[f"v{g}"]) / d
        e = (1 - alpha ** (g + 1)) / (1 - alpha) if alpha < 1 else g + 1
        print(f"| {g} | {v:.2f} | {e:.2f} | {e / (g * c + v):.2f}x |")


if __name__ == "__main__":
    main()
