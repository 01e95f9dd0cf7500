"""Open a model folder for serving: pick the runner by the files it holds, and read the
tokenizer and generation settings that travel with it.

    model.safetensors -> TorchRunner (a checkpoint)
    model.onnx        -> OrtRunner   (an exported folder)

Both kinds of folder carry `tokenizer.json` and `generation_config.json` (bos/eos ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import RagtopError
from .engine import EngineConfig, LLMEngine
from .runners.base import ModelRunner

RunnerKind = Literal["auto", "torch", "ort"]


@dataclass
class LoadedModel:
    path: Path
    runner: ModelRunner
    tokenizer: Any  # tokenizers.Tokenizer
    generation: dict[str, Any] = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation.get("eos_token_id")
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, with the bos token first when the model was trained so
        (generation_config: bos_token_id, unless add_bos_token is false)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.generation.get("bos_token_id")
        if bos is not None and self.generation.get("add_bos_token", True) and ids[:1] != [bos]:
            ids = [int(bos), *ids]
        return ids

    def engine(self, config: EngineConfig | None = None) -> LLMEngine:
        return LLMEngine(self.runner, self.tokenizer, self.eos_token_ids, config)


def detect_runner(path: Path) -> Literal["torch", "ort"]:
    path = Path(path)
    if not path.is_dir():
        raise RagtopError(f"model folder not found: {path}")
    if (path / "model.onnx").is_file():
        return "ort"
    if (path / "model.safetensors").is_file():
        return "torch"
    raise RagtopError(f"{path} holds neither model.onnx (exported) nor model.safetensors (checkpoint)")


def load_model(
    path: Path,
    runner: RunnerKind = "auto",
    threads: int | None = None,
    onnx_file: str | None = None,
    use_plugin: bool = True,
    device: str | None = None,
    paged: bool | None = False,
) -> LoadedModel:
    """onnx_file: another graph of an exported folder (e.g. model.int8.onnx); use_plugin=False
    runs the standard-op function bodies even when the ragtop plugin is built; device: where a
    checkpoint runs (TorchRunner; "cuda" uses the Triton kernels of ragtop.gpu); paged: an
    exported folder's paged-KV graph (`--paged-kv`) with a paged cache (kv_cache.py); None: that
    when the folder has one (an exported folder), else the contiguous cache."""
    path = Path(path)
    found = detect_runner(path)
    kind = found if runner == "auto" else runner
    if kind != found:
        want = "model.onnx (an exported folder)" if kind == "ort" else "model.safetensors (a checkpoint)"
        raise RagtopError(
            f"--runner {kind} needs {want}; {path} holds {'model.onnx' if found == 'ort' else 'model.safetensors'}"
        )
    if paged is None:
        paged = kind == "ort" and has_paged_graph(path)
    if paged and kind != "ort":
        raise RagtopError("a paged KV cache needs an exported folder (the onnxruntime runner)")
    if kind == "ort" and device not in (None, "cpu"):
        raise RagtopError(f"--device {device} runs checkpoints (the torch runner); {path} is an exported ONNX folder")
    if kind == "ort":
        from .runners.onnxruntime import OrtRunner

        model_runner: ModelRunner = OrtRunner(path, threads, use_plugin, onnx_file, paged=paged)
    else:
        try:
            import torch
        except ImportError:
            raise RagtopError(
                f"{path} is a checkpoint: serving it needs PyTorch (pip install 'ragtop[train]'); "
                f"or export it (export-model) and serve the ONNX folder, which needs no PyTorch"
            ) from None

        from .runners.torch import TorchRunner

        if threads:
            torch.set_num_threads(threads)
        model_runner = TorchRunner.from_checkpoint(path, device=device)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise RagtopError(f"{path} has no tokenizer.json")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise RagtopError(f"cannot read {tok_file}: {e}") from None
    gen_file = path / "generation_config.json"
    try:
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise RagtopError(f"corrupt {gen_file}: {e}") from None
    return LoadedModel(path, model_runner, tokenizer, generation)


def has_paged_graph(path: Path) -> bool:
    """An exported folder written with `--paged-kv` (genai_config.json names its paged graph)."""
    import json

    try:
        cfg = json.loads((Path(path) / "genai_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("ragtop", {}).get("kv_cache", {}).get("paged"))
