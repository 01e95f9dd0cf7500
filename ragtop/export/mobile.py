"""Edge / mobile artefacts: ORT-format models and dynamic int8 quantization.

ORT format: `python -m onnxruntime.tools.convert_onnx_models_to_ort`, "Fixed" optimization
style. Without the plugin the ragtop functions are inlined (pure standard ops: runs on a
stock or minimal onnxruntime built with `--include_ops_by_config required_operators.config`).
With the plugin library (`--custom_op_library`) the .ort keeps the ragtop nodes and then
needs the plugin to load; that variant is written to `ort-plugin/` only when a library is
given or found.

int8: `onnxruntime.quantization.quantize_dynamic` quantizes the weight MatMuls and Gathers
of the main graph; the custom nodes and their function bodies (attention, ragged embedding)
stay in float, so attention itself is not quantized.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import RagtopError
from ..runtime.plugin import plugin_library_path


def find_plugin_library(explicit: Path | None = None) -> Path | None:
    """The ragtop onnxruntime plugin: `explicit` if given (must exist), else the library
    `make install` built into the package, else None."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise RagtopError(f"plugin library not found: {explicit}")
        return Path(explicit)
    return plugin_library_path()


def convert_to_ort(onnx_path: Path, out_dir: Path, custom_op_library: Path | None = None) -> tuple[Path, Path]:
    """Convert one .onnx to `out_dir/<stem>.ort`; returns (ort file, required_operators.config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime.tools.convert_onnx_models_to_ort",
            str(onnx_path),
            "--output_dir",
            tmp,
            "--optimization_style",
            "Fixed",
        ]
        if custom_op_library is not None:
            cmd += ["--custom_op_library", str(custom_op_library)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        produced = Path(tmp) / (onnx_path.stem + ".ort")
        if r.returncode != 0 or not produced.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RagtopError(f"ORT-format conversion of {onnx_path.name} failed: {tail[0][:300]}")
        ort_file = out_dir / produced.name
        config = out_dir / "required_operators.config"
        shutil.move(produced, ort_file)
        shutil.move(Path(tmp) / (onnx_path.stem + ".required_operators.config"), config)
    return ort_file, config


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing advice
    external = onnx_path.with_name(onnx_path.name + ".data").exists()  # > 2 GB models
    quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8, use_external_data_format=external)
    return out_path


@dataclass
class Agreement:
    tokens: int
    top1_agreement: float
    source: str


def top1_agreement(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, spec, ids: list[int], window: int, source: str
) -> Agreement:
    """Teacher-forced next-token argmax of two sessions over `ids`, in windows of `window`
    tokens from an empty cache (all-position logits), as a fraction of positions agreeing."""
    from .verify import np_dtype, round_capacity

    same = total = 0
    capacity = round_capacity(window, spec)
    for start in range(0, max(len(ids) - 1, 1), window):
        chunk = np.array([ids[start : start + window]], dtype=np.int64)  # [1,S]
        S = chunk.shape[1]
        feeds = {
            "input_ids": chunk,
            "past_lengths": np.zeros(1, dtype=np.int64),
            "logits_indices": np.arange(S, dtype=np.int64)[None],
        }
        for i in range(spec.n_layers):
            for kind in spec.cache_names:
                slots = capacity // spec.block_size if kind.startswith("key_m") else capacity
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                    (1, spec.n_kv_heads, slots, spec.head_dim), np_dtype(spec)
                )
        a = reference.run(["logits"], feeds)[0].argmax(-1)
        b = candidate.run(["logits"], feeds)[0].argmax(-1)
        same += int((a == b).sum())
        total += a.size
    return Agreement(total, same / max(total, 1), source)
