"""Import of a tiny llama GGUF written here with gguf.GGUFWriter (no download, seconds)."""

from __future__ import annotations

import dataclasses
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

CFG = ModelConfig(
    vocab_size=0 + 3 + 256 + 3,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    max_seq_len=64,
    rope_theta=5000.0,
    norm_eps=1e-6,
    tie_embeddings=True,
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF rotate-half -> GGUF pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tiny_gguf(
    path, model: Transformer, arch: str = "llama", untied: bool = False, quantized: bool = False
) -> None:
    """quantized: as llama.cpp's Q4_1 files — the embedding Q8_0, the other matrices Q4_1
    where their rows are whole blocks of 32 (ffn_down, 48 wide, stays F32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    add = w.add_tensor
    if quantized:
        Q = gguf.GGMLQuantizationType

        def add(name: str, t: np.ndarray) -> None:
            if t.ndim == 2 and t.shape[1] % 32 == 0:
                kind = Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1
                w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)
            else:
                w.add_tensor(name, t)

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
    add("token_embd.weight", sd["embed.weight"])
    for i in range(c.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", sd[p + "attn_norm.weight"])
        add(b + "attn_q.weight", llama_cpp_permute(sd[p + "attn.q_proj.weight"], c.n_heads))
        add(b + "attn_k.weight", llama_cpp_permute(sd[p + "attn.k_proj.weight"], c.n_kv_heads))
        add(b + "attn_v.weight", sd[p + "attn.v_proj.weight"])
        add(b + "attn_output.weight", sd[p + "attn.o_proj.weight"])
        add(b + "ffn_norm.weight", sd[p + "mlp_norm.weight"])
        add(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["norm.weight"])
    if untied:
        add("output.weight", sd["embed.weight"][::-1].copy())
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
    assert (
        main(
            [
                "convert",
                str(out),
                "--out",
                str(sparse),
                "--attention",
                "topk",
                "--topk",
                "4",
                "--block-size",
                "4",
                "--block-budget",
                "2",
            ]
        )
        == 0
    )
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
    # SmolLM2-135M's per-layer budgets do not fit this model's layers: their mean in each
    assert len(defaults.DEFAULT_LAYER_BUDGETS) != cfg.n_layers
    assert (cfg.attention.layer_budgets, cfg.attention.block_budget) == ((), defaults.DEFAULT_UNIFORM_BUDGET)


CFG_Q = dataclasses.replace(CFG, d_ff=64)  # every matrix whole blocks of 32


@pytest.fixture
def tiny_q4(tmp_path):
    model = Transformer(CFG_Q).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "tiny-q4_1.gguf"
    write_tiny_gguf(path, model, quantized=True)
    return path


def test_quantized_gguf_keeps_the_files_blocks(tiny_q4, tmp_path):
    """Import keeps the raw Q4_1 / Q8_0 blocks beside the fp32 weights; they dequantise to
    exactly those weights (q/k rows reordered like the weights); convert carries them, and
    drops those that no longer describe the written weights."""
    from gguf.quants import dequantize
    from safetensors.torch import load_file, save_file

    from ragtop.quant import load_file_blocks

    imported = read_gguf(tiny_q4)
    kinds = {n: b.kind for n, b in imported.blocks.items()}
    assert kinds.pop("embed.weight") == "q8_0"
    assert len(kinds) == 7 * CFG_Q.n_layers and set(kinds.values()) == {"q4_1"}
    for name, fb in imported.blocks.items():
        assert np.array_equal(fb.dequantize(), imported.state[name].numpy()), name
    raw = next(t for t in gguf.GGUFReader(str(tiny_q4)).tensors if t.name == "token_embd.weight")
    assert np.array_equal(dequantize(raw.data, raw.tensor_type), imported.blocks["embed.weight"].dequantize())

    out = tmp_path / "ckpt"
    assert main(["import", "gguf", str(tiny_q4), "--out", str(out)]) == 0
    kept = load_file_blocks(out)
    assert set(kept) == set(imported.blocks)
    sparse = tmp_path / "sparse"
    assert main(["convert", str(out), "--out", str(sparse), "--attention", "topk", "--topk", "4"]) == 0
    assert set(load_file_blocks(sparse)) == set(kept)
    # a weight changed since the import (fine-tuning, say): its blocks are not carried on
    state = load_file(str(out / "model.safetensors"))
    state["layers.1.mlp.up_proj.weight"] += 1e-3
    save_file(state, str(out / "model.safetensors"))
    again = tmp_path / "again"
    assert main(["convert", str(out), "--out", str(again), "--attention", "topk", "--topk", "4"]) == 0
    assert set(load_file_blocks(again)) == set(kept) - {"layers.1.mlp.up_proj.weight"}


def test_int4_export_computes_the_files_values(tiny_q4, tmp_path, capsys):
    """--weights int4 from a quantized GGUF: MatMulNBits holds the file's own Q4_1 / Q8_0 blocks,
    so with fp32 compute (accuracy level 0, the default) the graph matches the imported fp32
    model (the file's values) to float rounding — no second rounding; the tied head and the
    embedding share the same initializers."""
    import onnx

    ckpt = tmp_path / "ckpt"
    assert main(["import", "gguf", str(tiny_q4), "--out", str(ckpt)]) == 0
    out = tmp_path / "onnx"
    rc = main(["export", str(ckpt), str(out), "--weights", "int4", "--atol", "1e-4", "--rtol", "0"])
    assert rc == 0, capsys.readouterr()
    report = json.loads((out / "export_report.json").read_text())
    # every matrix from the file: the validation reference is the imported model itself
    assert report["weights"]["matrices"] == {"gguf q8_0": 1, "gguf q4_1": 7 * CFG_Q.n_layers}
    assert report["validation"]["passed"] and report["validation"]["greedy_match"]
    m = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert (
        ops.count("MatMulNBits") == 4 * CFG_Q.n_layers + 2
    )  # q/k/v and gate/up stacked; the 8-bit head as two 4-bit halves
    init = {i.name: i for i in m.graph.initializer}
    for half in ("embed_hi_q", "embed_lo_q"):  # read by the head's MatMulNBits and the embedding's Gather
        assert init[half].data_type == onnx.TensorProto.UINT8 and list(init[half].dims) == [CFG_Q.vocab_size, 1, 16]
    assert not any(
        i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) >= 32 for i in m.graph.initializer
    )
