"""`ragtop bench retrieval`: a synthetic long-context retrieval test (no download).

A pass key (a random 5-digit number) is hidden at a given depth of `length` tokens of
repetitive filler text (the passkey test of Mohtashami & Jaggi 2023); the prompt ends with
"What is the pass key? The pass key is" and the model answers greedily. A trial is correct
when the key appears in the first `answer_tokens` generated tokens. Every setting (dense
first, then each sparse setting of `ragtop sweep --setting`) sees the same prompts, so the
table compares them cell by cell: accuracy by context length and depth.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import AttentionConfig, KVCache, Transformer

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    key: str
    length: int  # target length in tokens (the prompt is within one filler sentence of it)
    depth: float  # fraction of the filler placed before the needle
    needle_at: int  # token index where the needle starts


def make_prompt(tokenizer, length: int, depth: float, key: str, prefix: Sequence[int] = ()) -> Prompt:
    """`prefix` + intro + filler (needle after `depth` of it) + question, about `length` tokens.

    Pieces are tokenized separately (each after a space), so the filler is a whole number of
    repetitions of one sentence group and the needle sits exactly between two of them.
    """
    enc = lambda s: tokenizer.encode(" " + s).ids  # noqa: E731
    intro, filler, needle, question = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    fixed = len(prefix) + len(intro) + len(needle) + len(question)
    units = max(1, (length - fixed) // len(filler))
    before = round(depth * units)
    ids = [*prefix, *intro, *filler * before]
    at = len(ids)
    ids += [*needle, *filler * (units - before), *question]
    return Prompt(ids, key, length, depth, at)


@torch.no_grad()
def greedy(model: Transformer, ids: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy continuation through the KV cache (prefill once, then one token per step)."""
    cache = KVCache.allocate(model.config, 1, len(ids) + new_tokens)
    logits = model(torch.tensor([list(ids)]), cache=cache, last_only=True)
    out = []
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache)
    return out


def make_prompts(
    tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0, prefix: Sequence[int] = ()
) -> list[Prompt]:
    rng = random.Random(seed)
    return [
        make_prompt(tokenizer, n, d, str(rng.randint(10000, 99999)), prefix)
        for n in lengths
        for d in depths
        for _ in range(trials)
    ]


def run_retrieval(
    model: Transformer,
    tokenizer,
    settings: Sequence[tuple[str, AttentionConfig]],
    prompts: Sequence[Prompt],
    answer_tokens: int = 8,
    out: Path | None = None,
    log: Callable[[str], None] = print,
    done: Sequence[dict] = (),
    generator: Callable[[AttentionConfig], Callable[[Sequence[int], int], list[int]]] | None = None,
    extra: dict | None = None,
) -> list[dict]:
    """One row per (setting, prompt): whether the greedy answer holds the key. Rows in
    `done` (an earlier run's JSON lines) are kept and their trials not run again.
    `generator(attention)` gives the greedy function of a setting (default: the PyTorch
    reference on `model`); `extra` is added to every row (e.g. the runner)."""
    from ..convert.sparsify import with_attention

    if generator is None:
        generator = lambda attention: lambda ids, n: greedy(with_attention(model, attention), ids, n)  # noqa: E731
    key = lambda r: (r["setting"], r["length"], r["depth"], r["key"])  # noqa: E731
    earlier = {key(r): r for r in done}
    rows = []
    for name, attention in settings:
        generate = None
        t0 = time.perf_counter()
        for p in prompts:
            if (name, p.length, p.depth, p.key) in earlier:
                rows.append(earlier[(name, p.length, p.depth, p.key)])
                continue
            generate = generate or generator(attention)
            answer = tokenizer.decode(generate(p.ids, answer_tokens))
            row = {
                "setting": name,
                "length": p.length,
                "tokens": len(p.ids),
                "depth": p.depth,
                "key": p.key,
                "answer": answer,
                "correct": p.key in answer,
                "attention": attention.to_dict(),
                **(extra or {}),
            }
            rows.append(row)
            if out is not None:
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        done = [r for r in rows if r["setting"] == name]
        log(f"{name:<40} {sum(r['correct'] for r in done)}/{len(done)} correct ({time.perf_counter() - t0:.0f}s)")
    return rows


def retrieval_table(rows: Sequence[dict]) -> str:
    """Markdown: accuracy per setting and length, with the misses' depths named."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    lines = [
        "| setting | " + " | ".join(f"{n} tokens" for n in lengths) + " | all |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    for s in settings:
        cells = []
        mine = [r for r in rows if r["setting"] == s]
        for n in lengths:
            cell = [r for r in mine if r["length"] == n]
            if not cell:
                cells.append("–")
                continue
            missed = sorted({r["depth"] for r in cell if not r["correct"]})
            text = f"{sum(r['correct'] for r in cell)}/{len(cell)}"
            if missed:
                text += " (missed at depth " + ", ".join(f"{d:g}" for d in missed) + ")"
            cells.append(text)
        cells.append(f"{sum(r['correct'] for r in mine)}/{len(mine)}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floats(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or min(vals) < 0 or max(vals) > 1:
        raise argparse.ArgumentTypeError(f"depths are fractions in [0, 1], got {s!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..convert.commands import _int_list

    p.add_argument("checkpoint", type=Path, help="a dense checkpoint (e.g. ragtop import smollm2)")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="SPEC",
        help="a sparse setting as in `ragtop sweep --setting` (repeatable); dense always runs first",
    )
    p.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192], help="prompt lengths in tokens")
    p.add_argument(
        "--depths", type=_floats, default=[0.1, 0.5, 0.9], help="needle depths (fraction of the filler before it)"
    )
    p.add_argument("--no-dense", action="store_true", help="skip the dense trials (e.g. to run a setting first)")
    p.add_argument("--trials", type=int, default=1, help="prompts (keys) per length and depth")
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per trial here")
    p.add_argument(
        "--resume", action="store_true", help="skip the trials already in --jsonl (same seed, lengths, depths)"
    )
    p.add_argument("--markdown", type=Path, default=None, help="write the table here")
    p.add_argument(
        "--runner",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the PyTorch reference; onnx: onnxruntime + the ragtop plugin on --export (attributes "
        "rewritten per setting, as `ragtop sweep --runner onnx`)",
    )
    p.add_argument("--export", type=Path, default=None, help="--runner onnx: a block-selection fp32 export")
    p.add_argument(
        "--dense-prefill",
        action="store_true",
        help="--runner onnx: the prompt attends densely, the answer tokens sparsely (Quest's serving mode)",
    )
    p.add_argument("--threads", type=int, default=None, help="--runner onnx: onnxruntime intra-op threads")


def run(a: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..convert.sweep import parse_setting
    from ..errors import RagtopError

    ckpt = load_checkpoint(a.checkpoint)
    if ckpt.config.attention.kind != "dense":
        raise RagtopError(f"{a.checkpoint}: start from a dense checkpoint (the settings are applied to it)")
    if max(a.lengths) > ckpt.config.max_seq_len:
        raise RagtopError(
            f"--lengths: {max(a.lengths)} exceeds the model's context of {ckpt.config.max_seq_len} tokens"
        )
    settings = [] if a.no_dense else [("dense", AttentionConfig())]
    settings += [(s.name, s.attention()) for s in map(parse_setting, a.setting)]
    tok = ckpt.tokenizer()
    sep = ckpt.generation.get("document_separator_id", ckpt.generation.get("bos_token_id"))
    prompts = make_prompts(tok, a.lengths, a.depths, a.trials, a.seed, [] if sep is None else [int(sep)])
    done = []
    if a.resume and a.jsonl is not None and a.jsonl.is_file():
        done = [json.loads(line) for line in a.jsonl.read_text().splitlines() if line.strip()]
    generator, extra = None, None
    if a.runner == "onnx":
        generator, extra = onnx_generator(a), {"runner": "onnx", "dense_prefill": a.dense_prefill}
        if a.dense_prefill:  # rows of both modes may share a file: name them apart
            settings = [(n if n == "dense" else f"{n} (dense prefill)", s) for n, s in settings]
    elif a.dense_prefill:
        raise RagtopError("--dense-prefill needs --runner onnx")
    rows = run_retrieval(
        ckpt.model, tok, settings, prompts, a.answer_tokens, a.jsonl, done=done, generator=generator, extra=extra
    )
    table = retrieval_table(rows)
    print(table)
    if a.markdown is not None:
        a.markdown.write_text(table + "\n")
    return 0


def onnx_generator(a: argparse.Namespace):
    """greedy functions on the plugin kernel: one session per setting (ragtop/bench/onnx_sweep.py)."""
    from ..errors import RagtopError
    from .onnx_sweep import OnnxEvaluator, greedy_onnx

    if a.export is None:
        raise RagtopError("--runner onnx needs --export DIR (a block-selection export with fp32 weights)")
    ev = OnnxEvaluator(a.export, threads=a.threads)
    state: dict = {}

    def make(attention: AttentionConfig):
        if state.get("runner") is not None:
            state["runner"].close()
        r = state["runner"] = ev.runner(attention)
        dense = attention.kind == "dense"
        return lambda ids, n: greedy_onnx(r, ids, n, dense=dense, dense_prefill=a.dense_prefill)

    return make
