"""Dense + uniform ragtop equals transformers' LlamaForCausalLM with the same weights."""

import pytest
import torch
from torch.testing import assert_close

from ragtop.model import KVCache, ModelConfig, Transformer
from ragtop.runtime.bench import to_hf_llama as to_hf

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_dense_uniform_matches_llama(tie):
    cfg = ModelConfig(
        vocab_size=96,
        d_model=48,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        d_ff=80,
        max_seq_len=64,
        rope_theta=5000.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
    )
    model = Transformer(cfg).eval()
    for p in model.parameters():  # move norms off 1.0 so they are really compared
        p.add_(torch.randn_like(p) * 0.02)
    hf = to_hf(model)
    ids = torch.randint(0, 96, (2, 24))
    assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)
    cache = KVCache.allocate(cfg, 2, 32)  # and through the cache, token by token at the end
    out = torch.cat(
        [model(ids[:, :20], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(20, 24)], 1
    )
    assert_close(out, hf(ids).logits, atol=1e-5, rtol=1e-4)
