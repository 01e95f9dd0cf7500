"""The GPU path: Triton kernels with the semantics of the onnxruntime plugin (docs/kernels.md).

- `kernels.py`: the Triton kernels and their launch functions: the block min/max summary
  update, block-selection top-k decode attention over a shared KV cache with per-sequence
  lengths, and the ragged embedding gather + projection.
- `layers.py`: drop-in subclasses of the model's `TopKAttention` / `RaggedEmbedding` that
  call them, and `TritonPath`, which installs them in a model and keeps the block summaries
  of a runner's cache (used by `TorchRunner(device="cuda")`).

torch and triton only: the torch-free serving path (ONNX Runtime) never imports this package
(tests/test_import_rules.py). On a machine without CUDA the kernels still run, slowly,
through Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is imported): that is
how the tests check them on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import TYPE_CHECKING

from ..errors import RagtopError

if TYPE_CHECKING:  # the annotations only: importing this package loads neither torch nor triton
    import torch

    from ..model import Transformer
    from .layers import TritonPath


def triton_missing_reason() -> str | None:
    """None when triton can be imported, else a sentence saying why the GPU path cannot run."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'ragtop[test]' pins it)"
    return None


def resolve_device(name: str) -> torch.device:
    """A torch.device for `--device NAME`, with a clear error when CUDA is asked for but absent."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise RagtopError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RagtopError(
            f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False)"
        )
    return device


def triton_path(model: Transformer, device: torch.device, want: bool | None) -> TritonPath | None:
    """The `TritonPath` a TorchRunner uses on `device`, or None (reference code only).

    want=None: on CUDA when triton is installed (else a warning and the reference code);
    want=True: required (on CPU only under TRITON_INTERPRET=1, i.e. Triton's interpreter);
    want=False: never.
    """
    if want is False or (want is None and device.type != "cuda"):
        return None
    reason = triton_missing_reason()
    if reason is None and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = (
            f"the Triton kernels run on CUDA, or on {device.type} only under TRITON_INTERPRET=1 (Triton's interpreter)"
        )
    if reason is not None:
        if want:
            raise RagtopError(f"cannot use the Triton kernels: {reason}")
        warnings.warn(f"{reason}: the model runs the PyTorch reference code on {device}", stacklevel=3)
        return None
    from .layers import TritonPath

    return TritonPath(model)
