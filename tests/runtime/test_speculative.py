"""Self-speculative greedy decoding reproduces dense greedy decoding."""

from __future__ import annotations

import pytest
import torch

from ragtop.convert.sparsify import with_attention
from ragtop.model import AttentionConfig, ModelConfig, Transformer
from ragtop.runtime.speculative import speculative_greedy


@torch.no_grad()
def dense_greedy(m: Transformer, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


CYCLE = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:12].tolist()


def tiny(seed: int = 0) -> Transformer:
    """Fitted for a few steps to a cyclic sequence, so greedy walks many tokens (a random
    model repeats one)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128)
    m = Transformer(cfg)
    ids = torch.tensor(CYCLE * 4)[None]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_output_is_dense_greedy(gamma):
    dense = tiny()
    draft = with_attention(dense, AttentionConfig("topk", topk=2, block_size=4, block_budget=1, sink_tokens=1))
    prompt = CYCLE * 3 + [CYCLE[0]]
    want = dense_greedy(dense, prompt, 20)
    got, stats = speculative_greedy(dense, draft, prompt, 20, gamma)
    assert got == want and len(set(want)) > 3
    assert stats.rounds >= 1 and stats.drafted == gamma * stats.rounds and 0 <= stats.accepted <= stats.drafted


def test_a_dense_draft_is_always_accepted():
    dense = tiny()
    prompt = list(range(10))
    got, stats = speculative_greedy(dense, dense, prompt, 17, gamma=4)
    assert got == dense_greedy(dense, prompt, 17)
    assert stats.acceptance == 1.0 and stats.tokens_per_round == 5.0 and stats.rounds == 4


def test_rejected_drafts_are_rolled_back():
    """A draft with other weights is mostly wrong: the output is still dense's."""
    dense, other = tiny(0), tiny(1)
    prompt = [CYCLE[0], 3, 5, 30, 2, CYCLE[1]]
    got, stats = speculative_greedy(dense, other, prompt, 16, gamma=3)
    assert got == dense_greedy(dense, prompt, 16)
    assert stats.accepted < stats.drafted
