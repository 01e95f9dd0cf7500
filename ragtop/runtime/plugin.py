"""Finding and registering ragtop's ONNX Runtime plugin library (plugins/onnxruntime).

`make install` builds the library into `ragtop/_native/libragtop_ort.so` when a C++
compiler and the ONNX Runtime headers are available. A session that registers it runs the
native `ragtop::TopKAttention` / `ragtop::RaggedEmbedding` kernels; without it, the
standard-op function bodies inside the exported file run instead (same results, slower).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

LIBRARY_NAME = "libragtop_ort.so"
_NATIVE_DIR = Path(__file__).resolve().parents[1] / "_native"

_lock = threading.Lock()
_warned = False


def plugin_library_path() -> Path | None:
    """The built plugin library, or None when it has not been built."""
    path = _NATIVE_DIR / LIBRARY_NAME
    return path if path.is_file() else None


def _warn_once(message: str) -> None:
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def register_plugin(session_options) -> bool:
    """Register the plugin library with `session_options` (onnxruntime.SessionOptions).

    Returns True when the native kernels will be used. When the library is missing or
    cannot be loaded (wrong onnxruntime version, foreign CPU), warns once per process and
    returns False: the session then runs the function fallbacks.
    """
    path = plugin_library_path()
    if path is None:
        _warn_once(
            f"ragtop onnxruntime plugin not built ({_NATIVE_DIR / LIBRARY_NAME} missing; "
            "run `make install` with a C++ compiler); using the standard-op fallbacks"
        )
        return False
    try:
        session_options.register_custom_ops_library(os.fspath(path))
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
        _warn_once(f"ragtop onnxruntime plugin {path} failed to load ({e}); using the standard-op fallbacks")
        return False
    return True
