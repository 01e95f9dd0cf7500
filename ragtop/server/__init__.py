"""ragtop's OpenAI-compatible HTTP server (FastAPI + uvicorn) with Prometheus metrics.

    ragtop serve runs/smollm2-onnx --port 8000

app.py (create_app + lifespan), settings.py (the only environment reader), protocol.py
(pydantic bodies), serving.py (API <-> engine), routes/, metrics.py (every Prometheus object).
It uses only `ragtop.runtime`'s public API; nothing imports this package.
"""

from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
