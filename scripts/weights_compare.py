"""Exported folders side by side (e.g. --weights fp32 vs int4): file size, held-out
perplexity, top-1 and greedy agreement with the first folder, decode tokens/s.

    python scripts/weights_compare.py REF_DIR OTHER_DIR [...] [--windows 2 --window 2048]
        [--greedy 64] [--prompt-tokens 1024 --decode 64 --repeats 3 --threads 1]

Everything goes through ragtop's own runtime (`load_model(...).runner`, OrtRunner: shared
cache, the ragtop plugin when built), one thread by default. Perplexity: teacher-forced
windows of held-out State of the Union text (the training split's later years, as
`ragtop eval`), each from an empty cache, all positions scored. Decode: a prompt of
`--prompt-tokens` held-out tokens, then `--decode` greedy steps timed; the folders take turns
(A, B, A, B, ...) `--repeats` times and the medians are printed (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ragtop.runtime import load_model
from ragtop.runtime.runners.base import Chunk
from ragtop.train.corpus import load_sotu, split_by_year


def held_out_ids(folder: Path, data_dir: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "\n\n".join(d.text for d in split_by_year(load_sotu(data_dir))[1])
    return tok.encode(text).ids[:n]


def window_logits(runner, ids: list[int]) -> torch.Tensor:
    runner.allocate(1, len(ids))
    return runner.forward([Chunk(0, ids, 0, "all")])[0]  # [S, V]


def greedy(runner, prompt: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after `prompt`; seconds per decode step (the prefill not counted)."""
    runner.allocate(1, len(prompt) + n)
    logits = runner.forward([Chunk(0, prompt, 0)])[0]
    out = [int(logits.argmax())]
    t0 = time.perf_counter()
    for i in range(n - 1):
        logits = runner.forward([Chunk(0, [out[-1]], len(prompt) + i)])[0]
        out.append(int(logits.argmax()))
    return out, (time.perf_counter() - t0) / max(n - 1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--greedy", type=int, default=64, help="greedy tokens compared with the first folder")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("RAGTOP_DATA_DIR") or Path.home() / ".cache" / "ragtop")
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-quality", action="store_true", help="decode speed and greedy agreement only")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runners = {f: load_model(f, threads=a.threads).runner for f in a.folders}
    ids = held_out_ids(a.folders[0], a.data_dir, a.windows * a.window + a.prompt_tokens)
    results: dict[Path, dict] = {f: {"folder": str(f)} for f in a.folders}
    for f in a.folders:
        onnx_file = f / "model.onnx"
        data = f / "model.onnx.data"
        results[f]["model_mb"] = round(
            (onnx_file.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6, 1
        )
    # quality: perplexity, and next-token argmax agreement with the first folder, per window
    ref_top1: list[np.ndarray] = []
    for f in [] if a.no_quality else a.folders:
        nll, count, same, total = 0.0, 0, 0, 0
        for w in range(a.windows):
            chunk = ids[w * a.window : (w + 1) * a.window]
            logits = window_logits(runners[f], chunk)
            logp = torch.log_softmax(logits[:-1].float(), -1)
            nll -= float(logp.gather(1, torch.tensor(chunk[1:])[:, None]).sum())
            count += len(chunk) - 1
            top1 = logits.argmax(-1).numpy()
            if f == a.folders[0]:
                ref_top1.append(top1)
            else:
                same += int((top1 == ref_top1[w]).sum())
                total += top1.size
        results[f]["ppl"] = round(math.exp(nll / count), 3)
        results[f]["scored_tokens"] = count
        results[f]["top1_agreement"] = round(same / total, 4) if total else None
    # greedy agreement from a held-out prompt, and decode speed (interleaved repeats)
    prompt = ids[a.windows * a.window :][: a.prompt_tokens]
    speeds: dict[Path, list[float]] = {f: [] for f in a.folders}
    tokens: dict[Path, list[int]] = {}
    for _ in range(a.repeats):
        for f in a.folders:
            out, step = greedy(runners[f], prompt, max(a.greedy, a.decode))
            tokens[f] = out[: a.greedy]
            speeds[f].append(1 / step)
    ref = tokens[a.folders[0]]
    for f in a.folders:
        same_prefix = next((i for i, (x, y) in enumerate(zip(tokens[f], ref, strict=True)) if x != y), len(ref))
        results[f]["greedy_same_prefix"] = f"{same_prefix}/{len(ref)}"
        results[f]["decode_tok_s"] = [round(s, 2) for s in speeds[f]]
        results[f]["decode_tok_s_median"] = round(statistics.median(speeds[f]), 2)
    base = results[a.folders[0]]["decode_tok_s_median"]
    print(
        f"load average {os.getloadavg()[0]:.2f}; {a.windows} x {a.window} held-out tokens; prompt {len(prompt)} "
        "tokens, "
        f"{a.decode} decode steps x {a.repeats} interleaved repeats, {a.threads} thread(s)"
    )
    print(
        "| folder | model MB | perplexity | top-1 agreement | greedy (same first tokens) | decode tok/s (median) | vs "
        "first |"
    )
    print("|---|---|---|---|---|---|---|")
    for f in a.folders:
        r = results[f]
        r.setdefault("ppl", "-")
        r.setdefault("top1_agreement", None)
        print(
            f"| {f.name} | {r['model_mb']} | {r['ppl']} | "
            f"{r['top1_agreement'] if r['top1_agreement'] is not None else '-'} "
            f"| {r['greedy_same_prefix']} | {r['decode_tok_s_median']} ({', '.join(map(str, r['decode_tok_s']))}) "
            f"| {r['decode_tok_s_median'] / base:.2f}x |"
        )
    if a.json:
        a.json.write_text(json.dumps(list(results.values()), indent=2) + "\n")


if __name__ == "__main__":
    main()
