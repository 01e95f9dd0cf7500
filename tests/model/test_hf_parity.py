"""Dense + uniform ragtop equals transformers' LlamaForCausalLM with the same weights."""

import pytest
import torch
from torch.testing import assert_close

from ragtop.model import KVCache, ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def to_hf(model: Transformer):
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(layer.attn, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = getattr(layer.mlp, n).weight
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
    sd["lm_head.weight"] = model.embed.weight if c.tie_embeddings else model.lm_head.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    return hf


@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_dense_uniform_matches_llama(tie):
    cfg = ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80,
                      max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=tie)
    model = Transformer(cfg).eval()
    for p in model.parameters():  # move norms off 1.0 so they are really compared
        p.add_(torch.randn_like(p) * 0.02)
    hf = to_hf(model)
    ids = torch.randint(0, 96, (2, 24))
    assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)
    cache = KVCache.allocate(cfg, 2, 32)  # and through the cache, token by token at the end
    out = torch.cat([model(ids[:, :20], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(20, 24)], 1)
    assert_close(out, hf(ids).logits, atol=1e-5, rtol=1e-4)
