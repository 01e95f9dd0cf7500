"""Run the server under uvicorn with graceful shutdown.

SIGTERM / Ctrl-C: uvicorn stops accepting connections; the app answers 503 (with
Retry-After) to new requests on open connections (status "draining"); in-flight requests
get `shutdown_grace_s` seconds to finish, after which each one still open ends with a 503
(a stream: an error event and `[DONE]`); then the engine stops and the process exits 0.
A model that fails to load, or an engine whose runner breaks, stops the server with exit 1
so that a supervisor (systemd, Kubernetes) restarts it.
"""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from .app import Prepare, create_app
from .settings import ServerSettings
from .state import ServerState

# uvicorn cancels handlers still running this long after the grace period (by then the app
# has ended every open request itself, so this is only a backstop).
CANCEL_MARGIN_S = 5.0


def serve(settings: ServerSettings, prepare: Prepare | None = None) -> int:
    """Serve until SIGTERM / Ctrl-C (exit status 0) or a failure (1). `prepare` (the default
    model's first-run import and export) runs after the port is open; see `create_app`."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, prepare=prepare)
    server = RagtopServer(app, settings, settings.host, settings.port)
    server.run()
    return 1 if server.failures else 0


class RagtopServer(uvicorn.Server):
    """uvicorn.Server that drains the app on a shutdown signal, exits on a server failure,
    and does not re-raise the signal afterwards (so SIGTERM ends with exit status 0)."""

    def __init__(
        self,
        app: FastAPI,
        settings: ServerSettings,
        host: str,
        port: int,
        log_level: str | None = None,
        exit_on_failure: bool = True,
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level or settings.log_level,
            lifespan="on",
            timeout_graceful_shutdown=settings.shutdown_grace_s + CANCEL_MARGIN_S,
        )
        super().__init__(config)
        self.state: ServerState = app.state.ragtop
        self.grace_s = settings.shutdown_grace_s
        self.failures: list[str] = []
        if exit_on_failure:
            self.state.on_failure.append(self._on_failure)

    def _on_failure(self, message: str) -> None:
        self.failures.append(message)
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        self.state.begin_drain(self.grace_s)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a requested shutdown that completes is a success
