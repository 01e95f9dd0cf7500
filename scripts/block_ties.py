"""Is a block-selection export's prefill difference rounding, or a different block picked on
a near tie? Runs the validation's prefill case (export-model's seed and length) through the
PyTorch model in fp32 and in fp64 and compares, per layer, the blocks each query chose and
the keys top-k kept, and the logits.

    python scripts/block_ties.py CHECKPOINT   (a top-k checkpoint with --block-size/--block-budget)
"""

from __future__ import annotations

import sys

import torch

from ragtop.checkpoint import load_checkpoint
from ragtop.export.onnx import make_spec
from ragtop.export.verify import selecting_length
from ragtop.model import attention as att


def run(model, ids):
    """Logits and, per layer, the chosen-block mask [B,H,S,nb] and the block bounds."""
    seen, kept = [], []
    original = att.TopKAttention.block_selection
    original_topk = att.select_topk

    def spy_topk(scores, k):
        weights, idx = original_topk(scores, k)
        kept.append(idx.sort(-1).values)  # [B,H,chunk,k]; chunks of Q_CHUNK queries, in order
        return weights, idx

    def spy(self, q, k, ctx):
        chosen = original(self, q, k, ctx)
        bs = self.block_size
        seen.append(chosen[..., ::bs].clone())  # one column per block
        return chosen

    att.TopKAttention.block_selection = spy
    att.select_topk = spy_topk
    try:
        with torch.no_grad():
            logits = model(ids)
    finally:
        att.TopKAttention.block_selection = original
        att.select_topk = original_topk
    return logits, seen, kept


def main() -> None:
    torch.set_num_threads(1)
    ckpt = load_checkpoint(sys.argv[1])
    model = ckpt.model
    spec = make_spec(model, model.config.max_seq_len, "custom", "fp32", 18)
    g = torch.Generator().manual_seed(0)  # as verify.run_cases: the prefill ids are the first draw
    long = selecting_length(spec)
    ids = torch.randint(0, model.config.vocab_size, (1, long), generator=g)
    l32, c32, k32 = run(model, ids)
    l64, c64, k64 = run(model.double(), ids)
    layers = len(c32)
    per_layer = len(k32) // layers
    for i in range(layers):
        pos, n = set(), 0
        for j in range(per_layer):
            differ = (k32[i * per_layer + j] != k64[i * per_layer + j]).any(-1)  # [B,H,chunk]
            n += int(differ.sum())
            pos |= {j * att.Q_CHUNK + int(p) for p in differ.nonzero()[:, 2]}
        if n:
            print(
                f"layer {i}: top-k kept a different key set for {n} (query, head) pairs; positions {sorted(pos)[:12]}"
            )
    diff = (l32.double() - l64).abs()  # [1,S,V]
    per_pos = diff.amax(-1)[0]
    first_layer = None
    for i, (a, b) in enumerate(zip(c32, c64, strict=True)):
        differ = (a != b).any(-1)  # [B,H,S]: a query whose block set differs
        n = int(differ.sum())
        if n and first_layer is None:
            first_layer = i
        if n:
            pos = sorted(set(differ.nonzero()[:, 2].tolist()))
            print(f"layer {i}: {n} (query, head) pairs chose different blocks in fp32 and fp64; positions {pos[:12]}")
    print(
        f"prefill {long} tokens: max |logits fp32 - fp64| = {float(diff.max()):.2e} "
        f"(max |logits| {float(l64.abs().max()):.1f}); median over positions {float(per_pos.median()):.2e}"
    )
    top = per_pos.topk(5)
    print(
        "largest per-position differences:",
        [(int(p), f"{float(v):.1e}") for v, p in zip(top.values, top.indices, strict=True)],
    )
    if first_layer is None:
        print("no query chose a different block in fp32 and fp64")


if __name__ == "__main__":
    main()
