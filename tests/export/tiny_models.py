"""Tiny models of every variant for the export tests (random weights, fp32, CPU)."""

from __future__ import annotations

import torch

from ragtop.model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer

SENTENCES = [
    "the union is strong and the people are free",
    "we hold these truths to be self evident",
    "the state of the union is a report to the congress",
    "a government of the people by the people for the people",
    "ask not what your country can do for you",
] * 4

VOCAB = 96
ATTENTION = {
    "dense": AttentionConfig(),
    "topk": AttentionConfig("topk", topk=3),
    "block": AttentionConfig("topk", topk=3, block_size=4, block_budget=2),
    # sinks, a local window, a dense first layer and every key of the chosen blocks (Quest)
    "block-sinks": AttentionConfig(
        "topk", topk=12, block_size=4, block_budget=2, sink_tokens=2, local_window=3, dense_layers=1
    ),
    "topk-sinks": AttentionConfig("topk", topk=2, sink_tokens=1, local_window=2, dense_layers=1),
}
EMBEDDING = {
    "uniform": EmbeddingConfig(),
    "ragged": EmbeddingConfig("ragged", (24, 72), (16, 4)),
}
# every attention mode with both embeddings, except block selection (tested with ragged)
VARIANTS = [
    ("dense", "uniform"),
    ("topk", "uniform"),
    ("dense", "ragged"),
    ("topk", "ragged"),
    ("block", "ragged"),
    ("block-sinks", "uniform"),
    ("topk-sinks", "uniform"),
]


CYCLE = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:24].tolist()
PROMPT = CYCLE[:5]  # a prompt on the learnt cycle: greedy decoding walks it


def tiny_config(attention: str, embedding: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=64,
        attention=ATTENTION[attention],
        embedding=EMBEDDING[embedding],
    )


def tiny_model(attention: str, embedding: str, seed: int = 0, steps: int = 40) -> Transformer:
    """A tiny model fitted for a few steps to a cyclic token sequence, so its logits are
    peaked and greedy decoding walks through many tokens (a random tied model repeats
    one token, which would make the decode checks trivial)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(attention, embedding))
    ids = torch.tensor(CYCLE * 2)[None]  # [1,48]: the next token is a function of the current one
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
