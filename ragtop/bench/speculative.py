"""`ragtop bench speculative`: acceptance of a sparse draft under dense verification.

Prompt: the first `length` tokens of a held-out State of the Union speech (as the sweep).
Runs `ragtop.runtime.speculative.speculative_greedy` for each sparse setting and reports the
share of drafted tokens dense accepted and the tokens each dense pass yields; with
`--check`, also a plain dense greedy decode, asserting the outputs are identical. The
PyTorch reference measures acceptance only: tokens/s needs the plugin kernels (see the
design in docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a dense checkpoint")
    p.add_argument(
        "--setting", action="append", required=True, metavar="SPEC", help="sparse draft setting (as ragtop sweep)"
    )
    p.add_argument("--length", type=int, default=8192, help="prompt tokens (default 8192)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gamma", type=int, default=4, help="drafted tokens per dense pass")
    p.add_argument("--check", action="store_true", help="also decode densely and compare token for token")
    p.add_argument("--jsonl", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None)


def run(a: argparse.Namespace, default_data_dir) -> int:
    from ..checkpoint import load_checkpoint
    from ..convert.sparsify import with_attention
    from ..convert.sweep import make_passages, parse_setting
    from ..errors import RagtopError
    from ..model import KVCache
    from ..runtime.speculative import speculative_greedy
    from ..train.corpus import load_sotu, split_by_year

    ckpt = load_checkpoint(a.checkpoint)
    if ckpt.config.attention.kind != "dense":
        raise RagtopError(f"{a.checkpoint}: start from a dense checkpoint")
    tok = ckpt.tokenizer()
    sep = int(ckpt.generation.get("document_separator_id", ckpt.generation.get("bos_token_id", 0)))
    _, heldout = split_by_year(load_sotu(a.data_dir or default_data_dir()))
    passages = make_passages([(d.title, d.text) for d in heldout], tok, sep, a.length, 1)
    if not passages:
        raise RagtopError(f"no held-out speech has {a.length} tokens")
    prompt = passages[0].ids.tolist()
    dense = ckpt.model
    reference = None
    if a.check:
        cache = KVCache.allocate(dense.config, 1, len(prompt) + a.new_tokens)
        with torch.no_grad():
            logits = dense(torch.tensor([prompt]), cache=cache, last_only=True)
            reference = []
            for _ in range(a.new_tokens):
                reference.append(int(logits[0, -1].argmax()))
                logits = dense(torch.tensor([[reference[-1]]]), cache=cache)
    for spec in a.setting:
        s = parse_setting(spec)
        t0 = time.perf_counter()
        out, stats = speculative_greedy(dense, with_attention(dense, s.attention()), prompt, a.new_tokens, a.gamma)
        row = {
            "setting": s.name,
            "prompt": f"{passages[0].title}, first {a.length} tokens",
            "gamma": a.gamma,
            "new_tokens": a.new_tokens,
            "rounds": stats.rounds,
            "drafted": stats.drafted,
            "accepted": stats.accepted,
            "acceptance": round(stats.acceptance, 4),
            "tokens_per_dense_pass": round(stats.tokens_per_round, 3),
            "identical_to_dense": None if reference is None else out == reference,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row))
        if a.jsonl is not None:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        if reference is not None and out != reference:
            raise RagtopError(f"{s.name}: speculative output differs from dense greedy")
    return 0
