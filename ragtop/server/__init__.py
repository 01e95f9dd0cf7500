"""ragtop's OpenAI-compatible HTTP server (FastAPI + uvicorn) with Prometheus metrics.

    ragtop serve runs/smollm2-onnx --port 8000

app.py (create_app + lifespan), settings.py (the only environment reader), protocol.py
(pydantic bodies), serving.py (API <-> engine), routes/, metrics.py (every Prometheus object).
It uses only `ragtop.runtime`'s public API; nothing imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import create_app
    from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    """Imported on first use: building the CLI's parser reads settings.py without loading
    FastAPI (`from ragtop.server import create_app` works as before)."""
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
