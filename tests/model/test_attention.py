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
    "blocks-sinks-window": AttentionConfig(
        "topk", topk=3, block_size=4, block_budget=1, sink_tokens=2, local_window=3, dense_layers=1
    ),
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


@torch.no_grad()
def test_window_covering_every_key_is_dense():
    dense = model("dense")
    ids = torch.randint(0, 64, (2, 40))
    for att in (
        AttentionConfig("topk", topk=1, local_window=40),
        AttentionConfig("topk", topk=1, block_size=4, block_budget=1, local_window=40),
        AttentionConfig("topk", topk=1, sink_tokens=40),
    ):
        assert_close(same_weights(Transformer(dense.config.with_attention(att)).eval(), dense)(ids), dense(ids))


@torch.no_grad()
def test_dense_layers_are_dense():
    from ragtop.model import DenseAttention, TopKAttention

    dense = model("dense")
    cfg = dense.config.with_attention(AttentionConfig("topk", topk=2, sink_tokens=1, dense_layers=1))
    m = same_weights(Transformer(cfg).eval(), dense)
    assert isinstance(m.layers[0].attn, DenseAttention) and isinstance(m.layers[1].attn, TopKAttention)
    all_dense = same_weights(
        Transformer(cfg.with_attention(AttentionConfig("topk", topk=2, dense_layers=2))).eval(), dense
    )
    ids = torch.randint(0, 64, (1, 30))
    assert_close(all_dense(ids), dense(ids))
    assert (m(ids) - dense(ids)).abs().max() > 1e-4


@torch.no_grad()
def test_sinks_and_window_are_always_kept():
    """With top-1 plus one sink and a window of 2, each query attends to exactly the keys
    {0, p-1, p} and its best other key: checked against an explicit mask."""
    cfg = ModelConfig(
        vocab_size=8,
        d_model=8,
        n_layers=1,
        n_heads=1,
        n_kv_heads=1,
        d_ff=8,
        max_seq_len=32,
        attention=AttentionConfig("topk", topk=1, sink_tokens=1, local_window=2),
    )
    from ragtop.model import TopKAttention
    from ragtop.model.attention import AttnContext

    attn = TopKAttention(cfg)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    pos = torch.arange(12)[None]
    visible = (torch.arange(12)[None, :] <= torch.arange(12)[:, None])[None, None]
    out = attn.attend(q, k, v, AttnContext(None, None, pos, visible, None, causal=True))
    scores = (q * attn.scale) @ k.transpose(-1, -2)
    for p in range(12):
        keep = {0, p - 1, p} & set(range(p + 1))
        others = [j for j in range(p + 1) if j not in keep]
        if others:
            keep.add(max(others, key=lambda j: scores[0, 0, p, j].item()))
        js = sorted(keep)
        w = torch.softmax(scores[0, 0, p, js], -1)
        assert_close(out[0, 0, p], w @ v[0, 0, js])


def test_sink_window_config_is_validated():
    from ragtop.model import ConfigError

    with pytest.raises(ConfigError, match="sink_tokens"):
        AttentionConfig("topk", topk=4, sink_tokens=-1)
    with pytest.raises(ConfigError, match="dense attention takes no"):
        AttentionConfig(local_window=8)
    cfg = BASE.with_attention(AttentionConfig("topk", topk=4, sink_tokens=2, local_window=8, dense_layers=1))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = BASE.with_attention(AttentionConfig("topk", topk=4)).to_dict()
    for key in ("sink_tokens", "local_window", "dense_layers"):  # config.json written before these fields
        del old["attention"][key]
    assert ModelConfig.from_dict(old).attention == AttentionConfig("topk", topk=4)


@torch.no_grad()
def test_layer_budgets_give_each_layer_its_own_budget():
    """layer_budgets (1, 3): layer 0 selects like a budget-1 model's, layer 1 like budget 3's;
    equal layer budgets are one budget; the config round-trips and is validated."""
    from ragtop.model import ConfigError

    dense = model("dense")
    blocks = dict(topk=16, block_size=4, sink_tokens=1, local_window=2)
    per_layer = AttentionConfig("topk", block_budget=3, layer_budgets=(1, 3), **blocks)
    m = same_weights(Transformer(dense.config.with_attention(per_layer)).eval(), dense)
    assert [layer.attn.block_budget for layer in m.layers] == [1, 3]
    ids = torch.randint(0, 64, (1, 48))
    one = {
        b: same_weights(
            Transformer(dense.config.with_attention(AttentionConfig("topk", block_budget=b, **blocks))), dense
        )
        for b in (1, 3)
    }
    for other in one.values():
        assert (m(ids) - other(ids)).abs().max() > 1e-4
    same = AttentionConfig("topk", block_budget=3, layer_budgets=(3, 3), **blocks)
    assert_close(same_weights(Transformer(dense.config.with_attention(same)).eval(), dense)(ids), one[3](ids))
    cfg = dense.config.with_attention(per_layer)
    assert cfg.to_dict()["attention"]["layer_budgets"] == [1, 3]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "layer_budgets" not in BASE.to_dict()["attention"]  # files without it read the same
    with pytest.raises(ConfigError, match="3 entries for 2 layers"):
        dense.config.with_attention(AttentionConfig("topk", block_budget=3, layer_budgets=(1, 3, 2), **blocks))
    with pytest.raises(ConfigError, match="largest layer budget"):
        AttentionConfig("topk", block_budget=2, layer_budgets=(1, 3), **blocks)
    with pytest.raises(ConfigError, match=">= 1"):
        AttentionConfig("topk", block_budget=3, layer_budgets=(0, 3), **blocks)
    with pytest.raises(ConfigError, match="needs block selection"):
        AttentionConfig("topk", topk=4, layer_budgets=(1, 3))
