"""Run the server under uvicorn with graceful shutdown.

SIGTERM / Ctrl-C: uvicorn stops accepting connections, the app answers 503 to new requests
on open connections (status "draining"), in-flight requests get `shutdown_grace_s` seconds
to finish, then the engine stops. A model that fails to load stops the server (exit 1).
"""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import ServerSettings


def serve(settings: ServerSettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    state = app.state.ragtop
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s, lifespan="on")
    server = _DrainingServer(config, state)
    failures: list[str] = []

    def on_load_error(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    state.on_load_error.append(on_load_error)
    server.run()
    return 1 if failures else 0


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the app as draining when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if self.state.status in ("ready", "loading"):
            self.state.status = "draining"
        super().handle_exit(sig, frame)
