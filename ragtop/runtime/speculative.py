"""Self-speculative greedy decoding: a sparse-attention draft, dense verification.

The draft and the verifier are the same weights under two attention configs
(`with_attention`), sharing one KV cache. Each round the sparse model drafts `gamma` tokens
one at a time; the cache is rolled back (its length) to where the round began, and one
dense forward over the last accepted token + the `gamma` drafts rewrites those positions
with dense keys/values and gives dense's greedy choice after each; the longest prefix of
drafts that dense agrees with is accepted, plus dense's own next token. Every cached entry
that survives a round was written by a dense pass, so the output is dense's greedy output
(TriForce / MagicDec style); the sparse model only decides how many tokens one dense pass
yields. This is the PyTorch reference of the lossless mode (issue 15, item 4): it measures
acceptance, not speed (eager sparse attention is not faster than dense).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import KVCache, Transformer


@dataclass
class SpeculativeStats:
    rounds: int = 0  # dense verification passes after the prefill
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_round(self) -> float:
        """Tokens produced per dense pass (accepted drafts + dense's own token)."""
        return (self.accepted + self.rounds) / max(self.rounds, 1)


@torch.no_grad()
def speculative_greedy(
    dense: Transformer, draft: Transformer, prompt: Sequence[int], new_tokens: int, gamma: int = 4
) -> tuple[list[int], SpeculativeStats]:
    """Dense's greedy continuation of `prompt` (`new_tokens` tokens), drafted by `draft`."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    cache = KVCache.allocate(dense.config, 1, len(prompt) + new_tokens + gamma + 1)
    logits = dense(torch.tensor([list(prompt)]), cache=cache, last_only=True)  # dense prefill
    nxt = int(logits[0, -1].argmax())
    out, stats = [nxt], SpeculativeStats()
    while len(out) < new_tokens:
        start = int(cache.lengths[0])  # `nxt` is not cached yet
        drafts, tok = [], nxt
        for _ in range(gamma):
            tok = int(draft(torch.tensor([[tok]]), cache=cache)[0, -1].argmax())
            drafts.append(tok)
        cache.lengths = torch.tensor([start])  # roll back; the dense pass rewrites these positions
        choice = dense(torch.tensor([[nxt, *drafts]]), cache=cache)[0].argmax(-1).tolist()  # [gamma + 1]
        m = 0
        while m < gamma and drafts[m] == choice[m]:
            m += 1
        out += [*drafts[:m], choice[m]]
        cache.lengths = torch.tensor([start + m + 1])  # nxt + the accepted drafts stay cached
        nxt = choice[m]
        stats.rounds += 1
        stats.drafted += gamma
        stats.accepted += m
    return out[:new_tokens], stats
