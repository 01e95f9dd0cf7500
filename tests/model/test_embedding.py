import pytest
import torch
from torch.testing import assert_close

from ragtop.model import (
    ConfigError,
    EmbeddingConfig,
    ModelConfig,
    RaggedEmbedding,
    Transformer,
    UniformEmbedding,
)

BASE = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32)


def ragged_cfg(sizes, widths):
    return BASE.with_embedding(EmbeddingConfig("ragged", sizes, widths))


@torch.no_grad()
def test_one_full_width_tier_with_identity_projection_equals_uniform():
    uniform = Transformer(BASE).eval()
    ragged = Transformer(ragged_cfg((50,), (16,))).eval()
    state = dict(uniform.state_dict())
    table = state.pop("embed.weight")
    ragged.load_state_dict(
        {
            **state,
            "embed.tables.0": table,
            "embed.projs.0.weight": torch.eye(16),
            "embed.tier_of": torch.zeros(50, dtype=torch.long),
            "embed.row_of": torch.arange(50),
            "embed.head_order": torch.arange(50),
        }
    )
    ids = torch.randint(0, 50, (2, 12))
    assert_close(ragged.embed(ids), uniform.embed(ids))
    assert_close(ragged(ids), uniform(ids))  # the tied tiered head too


@torch.no_grad()
def test_ragged_lookup_uses_each_tokens_tier_and_row():
    cfg = ragged_cfg((10, 15, 25), (16, 4, 2))
    emb = RaggedEmbedding(cfg)
    tiers = [list(range(49, 39, -1)), list(range(15)), list(range(15, 40))]
    emb.set_tiers(tiers)
    assert emb.tiers() == tiers
    ids = torch.tensor([[49, 0, 20]])
    expect = torch.stack(
        [emb.projs[0](emb.tables[0][0]), emb.projs[1](emb.tables[1][0]), emb.projs[2](emb.tables[2][5])]
    )
    assert_close(emb(ids)[0], expect)
    h = torch.randn(3, 16)
    logits = emb.logits(h)
    assert_close(logits[:, 20], (h @ emb.projs[2].weight) @ emb.tables[2][5])
    assert_close(logits[:, 49], (h @ emb.projs[0].weight) @ emb.tables[0][0])


def test_tiers_must_cover_the_vocabulary():
    with pytest.raises(ConfigError, match="must sum to vocab_size"):
        ragged_cfg((10, 20), (16, 4))
    emb = RaggedEmbedding(ragged_cfg((25, 25), (16, 4)))
    with pytest.raises(ConfigError, match="exactly once"):
        emb.set_tiers([list(range(25)), list(range(24)) + [3]])


def test_parameter_counts_by_part():
    uniform = Transformer(BASE)
    ragged = Transformer(ragged_cfg((10, 40), (16, 4)))
    assert uniform.parameter_counts()["embedding"] == 50 * 16
    assert ragged.parameter_counts()["embedding"] == 10 * 16 + 16 * 16 + 40 * 4 + 4 * 16
    for m in (uniform, ragged):
        c = m.parameter_counts()
        assert c["total"] == sum(p.numel() for p in m.parameters())
        assert c["non_embedding"] == uniform.parameter_counts()["non_embedding"]
    assert isinstance(uniform.embed, UniformEmbedding)


def test_config_round_trip_and_errors():
    cfg = ragged_cfg((10, 40), (16, 4))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="topk >= 1"):
        ModelConfig.from_dict({**BASE.to_dict(), "attention": {"kind": "topk", "topk": 0}})
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({**BASE.to_dict(), "bogus": 1})
