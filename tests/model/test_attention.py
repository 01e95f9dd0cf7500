import pytest
import torch
from torch.testing import assert_close

from ragtop.model import (
    AttentionConfig,
    EmbeddingConfig,
    KVCache,
    ModelConfig,
    Transformer,
    topk_mask,
)
from ragtop.model.attention import select_topk

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
ATTENTIONS = {
    "dense": AttentionConfig(),
    "topk": AttentionConfig("topk", topk=5),
    "topk-blocks": AttentionConfig("topk", topk=5, block_size=4, block_budget=2),
}
EMBEDDINGS = {
    "uniform": EmbeddingConfig(),
    "ragged": EmbeddingConfig("ragged", tier_sizes=(8, 24, 32), tier_widths=(32, 8, 2)),
}
VARIANTS = [(a, e) for a in ATTENTIONS for e in EMBEDDINGS]


def model(attention: str, embedding: str = "uniform", **kw) -> Transformer:
    cfg = ModelConfig.from_dict({**BASE.to_dict(), "attention": {}, "embedding": {}, **kw})
    cfg = cfg.with_attention(ATTENTIONS[attention]).with_embedding(EMBEDDINGS[embedding])
    return Transformer(cfg).eval()


def same_weights(dst: Transformer, src: Transformer) -> Transformer:
    dst.load_state_dict(src.state_dict())
    return dst


@torch.no_grad()
def test_topk_with_k_at_least_sequence_equals_dense():
    dense = model("dense")
    ids = torch.randint(0, 64, (3, 40))
    cfg = dense.config.with_attention(AttentionConfig("topk", topk=40))
    assert_close(same_weights(Transformer(cfg).eval(), dense)(ids), dense(ids))


@torch.no_grad()
def test_topk_differs_from_dense_when_k_is_small():
    dense = model("dense")
    ids = torch.randint(0, 64, (1, 40))
    sparse = same_weights(model("topk"), dense)
    assert (sparse(ids)[:, 10:] - dense(ids)[:, 10:]).abs().max() > 1e-4
    assert_close(sparse(ids)[:, :5], dense(ids)[:, :5])  # <= k visible keys: identical


@pytest.mark.parametrize("attention,embedding", VARIANTS)
@torch.no_grad()
def test_no_future_leakage(attention, embedding):
    m = model(attention, embedding)
    ids = torch.randint(0, 64, (2, 30))
    changed = ids.clone()
    changed[:, 20:] = torch.randint(0, 64, (2, 10))
    assert_close(m(ids)[:, :20], m(changed)[:, :20])


@pytest.mark.parametrize("attention,embedding", VARIANTS)
@torch.no_grad()
def test_cached_chunks_equal_full_pass(attention, embedding):
    m = model(attention, embedding)
    ids = torch.randint(0, 64, (2, 33))
    full = m(ids)
    cache = KVCache.allocate(m.config, 2, 48)
    parts = [m(ids[:, a:b], cache=cache) for a, b in [(0, 13), (13, 14), (14, 30), (30, 33)]]
    assert_close(torch.cat(parts, 1), full)
    assert cache.lengths.tolist() == [33, 33]


@pytest.mark.parametrize("attention", ATTENTIONS)
@torch.no_grad()
def test_mixed_length_batch_matches_each_alone(attention):
    m = model(attention)
    a, b = torch.randint(0, 64, (1, 20)), torch.randint(0, 64, (1, 9))
    cache = KVCache.allocate(m.config, 2, 32)
    cache.lengths = torch.tensor([0, 0])
    # prefill each sequence into its own row (right-padded), then decode both together
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 11, dtype=torch.long)], 1)])
    m(padded, cache=cache)
    cache.lengths = torch.tensor([20, 9])
    nxt = torch.randint(0, 64, (2, 1))
    step = m(nxt, cache=cache)
    assert_close(step[0], m(torch.cat([a, nxt[:1]], 1))[0, -1:])
    assert_close(step[1], m(torch.cat([b, nxt[1:]], 1))[0, -1:])


def test_cache_overflow_is_an_error():
    m = model("dense")
    cache = KVCache.allocate(m.config, 1, 8)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_topk_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    assert topk_mask(scores, 2).tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    weights, idx = select_topk(scores, 2)
    assert sorted(idx[0].tolist()) == [1, 2] and sorted(idx[1].tolist()) == [0, 1]
    assert_close(weights, torch.full((2, 2), 0.5))


@torch.no_grad()
def test_block_selection_covering_every_block_is_exact_topk():
    exact = model("topk")
    ids = torch.randint(0, 64, (2, 40))
    cfg = exact.config.with_attention(AttentionConfig("topk", topk=5, block_size=4, block_budget=10))
    assert_close(same_weights(Transformer(cfg).eval(), exact)(ids), exact(ids))


@torch.no_grad()
def test_block_selection_reads_only_chosen_blocks():
    blocks = model("topk-blocks")
    exact = same_weights(model("topk"), blocks)
    ids = torch.randint(0, 64, (1, 40))
    # queries in the first 3 blocks see at most own + 2 earlier blocks: identical to exact
    assert_close(blocks(ids)[:, :12], exact(ids)[:, :12])
    assert (blocks(ids)[:, 12:] - exact(ids)[:, 12:]).abs().max() > 0
