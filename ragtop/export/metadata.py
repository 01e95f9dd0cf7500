"""genai_config.json: everything a runtime needs to drive an exported model.

The layout follows onnxruntime-genai's genai_config.json (`model.decoder` with file name,
sizes, `inputs` / `outputs` name maps with %d for the layer, `search` defaults) and adds a
`ragtop` section: cache layout, attention mode and parameters, embedding tiers, custom-op
domain, and how logits are selected. docs/export.md documents every field.
"""

from __future__ import annotations

from typing import Any

from ..model import ModelConfig
from . import ops
from .onnx import ExportSpec

FORMAT = "ragtop-onnx/1"


def genai_config(
    cfg: ModelConfig, spec: ExportSpec, generation: dict[str, Any], model_file: str, external_data: str | None
) -> dict[str, Any]:
    block = spec.attention_mode == "block"
    inputs = {
        "input_ids": "input_ids",
        "past_lengths": "past_lengths",
        "logits_indices": "logits_indices",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    if block:
        inputs |= {
            "past_key_min_names": "past_key_values.%d.key_min",
            "past_key_max_names": "past_key_values.%d.key_max",
        }
        outputs |= {"present_key_min_names": "present.%d.key_min", "present_key_max_names": "present.%d.key_max"}
    search = {
        k: generation[k]
        for k in ("temperature", "top_p", "top_k", "max_length", "repetition_penalty")
        if k in generation
    }
    e = cfg.embedding
    return {
        "format": FORMAT,
        "model": {
            "type": "ragtop",
            "context_length": spec.context_limit,
            "vocab_size": cfg.vocab_size,
            "bos_token_id": generation.get("bos_token_id"),
            "eos_token_id": generation.get("eos_token_id"),
            "pad_token_id": generation.get("pad_token_id", generation.get("eos_token_id")),
            "decoder": {
                "filename": model_file,
                "external_data": external_data,
                "opset": spec.opset,
                "dtype": spec.dtype,
                "weights": spec.weights,
                "matmul_accuracy_level": spec.accuracy_level if spec.weights in ("int4", "int8") else None,
                "matmul": spec.matmul if spec.weights in ("int4", "int8") else None,
                "hidden_size": cfg.d_model,
                "head_size": cfg.head_dim,
                "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads,
                "num_hidden_layers": cfg.n_layers,
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        "search": search,
        "ragtop": {
            "kv_cache": {
                "layout": "[batch, num_key_value_heads, capacity, head_size]",
                "summary_layout": "[batch, num_key_value_heads, capacity / block_size, head_size]" if block else None,
                "dtype": "float16" if spec.kv_dtype == "fp16" else "float32",  # key/value
                "summary_dtype": ("float16" if spec.dtype == "fp16" else "float32") if block else None,
                "capacity_multiple": spec.block_size or 1,
                "preallocated": True,
                "share_past_and_present": True,
                "positions": "token s of sequence b is at past_lengths[b] + s and is written there",
                "initial_summaries": "zeros" if block else None,
            },
            "logits": {
                "selection": "logits_indices",
                "last_only": "logits_indices = [[S - 1]] per sequence (or each sequence's last real token)",
                "all_positions": "logits_indices = arange(S) per sequence",
            },
            "attention": {
                "mode": spec.attention_mode,
                "kind": cfg.attention.kind,
                "topk": spec.topk,
                "block_size": spec.block_size,
                "block_budget": spec.block_budget,
                "sink_tokens": spec.sink_tokens,
                "local_window": spec.local_window,
                "dense_layers": spec.dense_layers,
                **(
                    {"layer_budgets": list(cfg.attention.layer_budgets)}
                    if spec.attention_mode == "block" and cfg.attention.layer_budgets
                    else {}
                ),
                "scale": cfg.head_dim**-0.5,
                "rope_theta": cfg.rope_theta,
            },
            "embedding": {
                "kind": e.kind,
                "num_tiers": spec.num_tiers,
                "tier_sizes": list(e.tier_sizes),
                "tier_widths": list(e.tier_widths),
                "tied_head": cfg.tie_embeddings,
            },
            "custom_ops": {
                "domain": ops.DOMAIN,
                "version": ops.OPSET_VERSION,
                "ops": [ops.TOPK_ATTENTION] + ([ops.RAGGED_EMBEDDING] if spec.num_tiers else []),
                "function_bodies": True,
                "plugin_optional": True,
            }
            if spec.ops == "custom"
            else None,
        },
    }
