"""`ragtop bench block-quality CKPT`: what block selection costs in quality.

The checkpoint's weights run with several attention variants on the held-out speeches:
dense, exact top-k, and top-k with block selection at several block sizes and budgets
(training-free: the weights are the same, only `AttentionConfig` changes). For each
variant: held-out perplexity over full windows of `--context` tokens, and the agreement of
its greedy next-token choice (argmax, teacher-forced at every position) with dense's and
with exact top-k's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored per variant")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")


def _windows(ckpt, data_dir: Path, context: int, max_tokens: int):
    import torch

    from ragtop.train.corpus import load_sotu, split_by_year

    tok = ckpt.tokenizer()
    bos = ckpt.generation.get("bos_token_id", 0)
    rows, total = [], 0
    for doc in split_by_year(load_sotu(data_dir))[1]:
        ids = torch.tensor([bos, *tok.encode(doc.text).ids], dtype=torch.long)
        for s in range(0, ids.numel() - context, context):  # full windows (+1 target) only
            rows.append(ids[s : s + context + 1])
            total += context
            if total >= max_tokens:
                return torch.stack(rows)
    return torch.stack(rows)


def _score(model, windows, batch: int = 4):
    """Mean NLL and the argmax prediction at every position (no grad)."""
    import torch
    import torch.nn.functional as F

    nll, preds = 0.0, []
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        preds.append(logits.argmax(-1))
    return nll / (windows.shape[0] * (windows.shape[1] - 1)), torch.cat(preds)


def run(args: argparse.Namespace, default_data_dir: Path) -> int:
    import torch

    with torch.no_grad():  # restores grad mode afterwards (other callers train in this process)
        return _run(args, default_data_dir)


def _run(args: argparse.Namespace, default_data_dir: Path) -> int:

    from ragtop.checkpoint import load_checkpoint
    from ragtop.model import AttentionConfig, Transformer

    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.config
    context = args.context or cfg.max_seq_len
    data_dir = args.data_dir or default_data_dir
    windows = _windows(ckpt, data_dir, context, args.max_tokens)
    state = ckpt.model.state_dict()

    variants = [("dense", AttentionConfig()), (f"top-{args.topk} exact", AttentionConfig("topk", topk=args.topk))]
    for bs in args.block_sizes:
        for budget in args.budgets:
            if budget * bs < context:  # a budget covering the whole window is exact top-k
                variants.append(
                    (
                        f"top-{args.topk} bs={bs} budget={budget}",
                        AttentionConfig("topk", topk=args.topk, block_size=bs, block_budget=budget),
                    )
                )
    results, ref = [], {}
    for name, att in variants:
        model = Transformer(cfg.with_attention(att)).eval()
        model.load_state_dict(state)
        loss, preds = _score(model, windows)
        if att.kind == "dense":
            ref["dense"] = preds
        elif att.block_size is None:
            ref["exact"] = preds
        agree = {k: round(float((preds == r).float().mean()), 4) for k, r in ref.items()}
        keys = None if att.block_size is None else (att.block_budget + 1) * att.block_size
        results.append(
            {
                "variant": name,
                "perplexity": round(math.exp(loss), 3),
                "greedy_agreement_vs_dense": agree.get("dense"),
                "greedy_agreement_vs_exact": agree.get("exact"),
                "candidate_keys_per_query": keys,
            }
        )
        if not args.json:
            print(
                f"{name:<32} ppl {math.exp(loss):9.3f}  greedy agreement vs dense {agree.get('dense', '-')}"
                f"  vs exact top-k {agree.get('exact', '-')}",
                flush=True,
            )
    report = {
        "checkpoint": str(args.checkpoint),
        "context": context,
        "tokens": int(windows.shape[0] * context),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
