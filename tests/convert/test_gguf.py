"""Import of a tiny llama GGUF written here with gguf.GGUFWriter (no download, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from ragtop.checkpoint import load_checkpoint
from ragtop.cli import main
from ragtop.convert.gguf import read_gguf, unpermute_qk
from ragtop.errors import RagtopError
from ragtop.model import ModelConfig, Transformer

gguf = pytest.importorskip("gguf")

CFG = ModelConfig(vocab_size=0 + 3 + 256 + 3, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=True)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF rotate-half -> GGUF pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tiny_gguf(path, model: Transformer, arch: str = "llama", untied: bool = False) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    tokens = SPECIAL + byte_alphabet() + ["Ġt", "he", "Ġthe"]
    assert len(tokens) == c.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["embed.weight"])
    for i in range(c.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "attn_norm.weight"])
        w.add_tensor(b + "attn_q.weight", llama_cpp_permute(sd[p + "attn.q_proj.weight"], c.n_heads))
        w.add_tensor(b + "attn_k.weight", llama_cpp_permute(sd[p + "attn.k_proj.weight"], c.n_kv_heads))
        w.add_tensor(b + "attn_v.weight", sd[p + "attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", sd[p + "attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "mlp_norm.weight"])
        w.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    if untied:
        w.add_tensor("output.weight", sd["embed.weight"][::-1].copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny(tmp_path):
    model = Transformer(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms off 1.0, so they are compared too
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, model)
    return model, path


def test_unpermute_inverts_llama_cpp():
    w = np.random.default_rng(0).standard_normal((4 * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 4), 4), w)


@torch.no_grad()
def test_tiny_import_matches_original_and_llama(tiny, hf_reference):
    original, path = tiny
    imported = read_gguf(path)
    assert imported.config == CFG
    model = imported.build()
    ids = torch.randint(0, CFG.vocab_size, (2, 20))
    assert_close(model(ids), original(ids))
    assert_close(model(ids), hf_reference(original)(ids).logits, atol=1e-4, rtol=1e-4)


def test_tiny_tokenizer_and_generation_config(tiny):
    from tokenizers import Tokenizer

    imported = read_gguf(tiny[1])
    tok = Tokenizer.from_str(imported.tokenizer_json)
    text = "<|im_start|>user\nsay the 2024 théâtre!<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # special tokens stay whole
    assert tok.token_to_id("Ġthe") in enc.ids  # merges apply
    assert " Ġ 2 0 2 4 " in " ".join(enc.tokens)  # "smollm" pre-tokenizer: one digit each
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    g = imported.generation
    assert (g["bos_token_id"], g["eos_token_id"], g["document_separator_id"]) == (1, 2, 0)
    assert g["chat_template"] == TEMPLATE


def test_cli_import_and_convert(tiny, tmp_path, capsys):
    original, path = tiny
    out = tmp_path / "ckpt"
    assert main(["import", "gguf", str(path), "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    ids = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        assert_close(ckpt.model(ids), original(ids))
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert ckpt.generation["eos_token_id"] == 2
    sparse = tmp_path / "sparse"
    assert main(["convert", str(out), "--out", str(sparse), "--attention", "topk", "--topk", "4",
                 "--block-size", "4", "--block-budget", "2"]) == 0
    cfg = load_checkpoint(sparse).config.attention
    assert (cfg.kind, cfg.topk, cfg.block_size, cfg.block_budget) == ("topk", 4, 4, 2)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "GGUF file not found"),
        (lambda p: p.write_bytes(b"not a gguf at all"), "is not a GGUF file"),
    ],
)
def test_bad_files(tmp_path, make, message, capsys):
    path = tmp_path / "model.gguf"
    make(path)
    assert main(["import", "gguf", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, Transformer(CFG), arch="gpt2")
    with pytest.raises(RagtopError, match="unsupported architecture 'gpt2'"):
        read_gguf(path)


@torch.no_grad()
def test_untied_output_head(tmp_path):
    model = Transformer(CFG).eval()
    path = tmp_path / "untied.gguf"
    write_tiny_gguf(path, model, untied=True)
    imported = read_gguf(path)
    assert not imported.config.tie_embeddings
    assert_close(imported.state["lm_head.weight"], model.embed.weight.flip(0))


def test_import_with_served_defaults(tiny, tmp_path):
    from ragtop.convert import defaults

    out = tmp_path / "served"
    assert main(["import", "gguf", str(tiny[1]), "--out", str(out), "--served-defaults"]) == 0
    cfg = load_checkpoint(out).config
    assert (cfg.attention.kind, cfg.attention.topk) == (defaults.DEFAULT_ATTENTION, defaults.DEFAULT_TOPK)
    assert cfg.embedding.kind == defaults.DEFAULT_EMBEDDING
