"""Checkpoint folders: the on-disk form of a model (no pickle anywhere).

config.json             {"model": ModelConfig.to_dict(), ...extra metadata}
model.safetensors       the state dict (tier buffers included)
tokenizer.json          a Hugging Face `tokenizers` file
tiers.json              ragged embeddings only: token ids of each tier, human-readable
generation_config.json  bos/eos ids, chat template, sampling defaults
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RagtopError
from .model import ConfigError, ModelConfig, RaggedEmbedding, Transformer

CONFIG, WEIGHTS, TOKENIZER, TIERS, GENERATION = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tiers.json",
    "generation_config.json",
)


@dataclass
class Checkpoint:
    model: Transformer
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # config.json minus "model"
    generation: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / TOKENIZER))


def save_checkpoint(
    out: Path,
    model: Transformer,
    tokenizer_json: str | None = None,
    meta: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    tiers_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (created if needed; files in it are replaced)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"format": "ragtop-checkpoint/1", "model": model.config.to_dict(), **(meta or {})}
    (out / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    if tokenizer_json is not None:
        (out / TOKENIZER).write_text(tokenizer_json)
    if isinstance(model.embed, RaggedEmbedding):
        tiers = [
            {"tier": i, "width": int(model.embed.tables[i].shape[1]), "token_ids": ids}
            for i, ids in enumerate(model.embed.tiers())
        ]
        (out / TIERS).write_text(json.dumps({**(tiers_meta or {}), "tiers": tiers}) + "\n")
    (out / GENERATION).write_text(json.dumps(generation or {}, indent=2) + "\n")
    return out


def read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = Path(path)
    if not path.is_dir():
        raise RagtopError(f"checkpoint folder not found: {path}")
    f = path / CONFIG
    if not f.is_file():
        raise RagtopError(f"{path} is not a ragtop checkpoint: {CONFIG} is missing")
    try:
        raw = json.loads(f.read_text())
        cfg = ModelConfig.from_dict(raw["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RagtopError(f"corrupt checkpoint config {f}: {e}") from None
    except ConfigError as e:
        raise RagtopError(f"invalid model config in {f}: {e}") from None
    return cfg, {k: v for k, v in raw.items() if k != "model"}


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a checkpoint folder; every problem becomes a RagtopError naming the file."""
    path = Path(path)
    cfg, meta = read_config(path)
    w = path / WEIGHTS
    if not w.is_file():
        raise RagtopError(f"{path} is not a ragtop checkpoint: {WEIGHTS} is missing")
    try:
        state = load_file(str(w))
    except (SafetensorError, OSError, ValueError) as e:
        raise RagtopError(f"corrupt weights file {w}: {e}") from None
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RagtopError(
            f"weights in {w} do not match config.json: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}"
        )
    gen_file = path / GENERATION
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    return Checkpoint(model.to(dtype).eval(), path, meta, generation)
