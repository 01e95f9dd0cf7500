"""`ServerState`: what the app and its routes share (status, settings, metrics, the serving
object), reached from a request with `state_of(request)`.

Its own module so that app.py (which includes the routes) and routes/* (which read the state)
do not import each other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request

from ..runtime import AsyncEngine
from .metrics import ServerMetrics
from .serving import ApiError, OpenAIServing
from .settings import ServerSettings

log = logging.getLogger("ragtop.server")

Status = Literal["loading", "ready", "failed", "draining"]


@dataclass
class ServerState:
    """What the routes reach through `request.app.state.ragtop`."""

    settings: ServerSettings
    metrics: ServerMetrics
    status: Status = "loading"
    error: str | None = None
    detail: str | None = None  # while loading: what the loader is doing ("exporting ... to ONNX")
    serving: OpenAIServing | None = None
    engine: AsyncEngine | None = None
    on_failure: list[Callable[[str], None]] = field(default_factory=list)  # load failed or engine died
    _drain_timer: threading.Timer | None = None

    def ready_serving(self) -> OpenAIServing:
        if self.status == "ready" and self.serving is not None:
            return self.serving
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.status == "draining":
            raise ApiError(
                503,
                "the server is shutting down; retry on another replica or later",
                "service_unavailable",
                headers=retry,
            )
        if self.status == "failed":
            raise ApiError(503, self.error or "the server failed", "service_unavailable")
        doing = f" ({self.detail})" if self.detail else ""
        raise ApiError(503, f"the model is still loading{doing}; retry shortly", "service_unavailable", headers=retry)

    def progress(self, message: str) -> None:
        """What the loader does now: logged, and shown on /health and in 503s while loading."""
        self.detail = message
        log.info("%s", message)

    def fail(self, message: str) -> None:
        """The server cannot serve (the load failed, or the engine died): unhealthy, and the
        `on_failure` callbacks run (the CLI exits non-zero)."""
        if self.status == "failed":
            return
        self.status, self.error = "failed", message
        log.error("%s", message)
        for callback in self.on_failure:
            callback(message)

    def begin_drain(self, grace_s: float) -> None:
        """Stop admitting; after `grace_s` end whatever is still running with a 503."""
        if self.status in ("ready", "loading"):
            self.status = "draining"
        if self._drain_timer is None and self.engine is not None:
            engine = self.engine

            def expire() -> None:
                n = engine.fail_all(
                    f"the server shut down before this request finished (grace period {grace_s:g} s); retry it", 503
                )
                if n:
                    log.warning("shutdown grace period of %g s expired: ended %d open request(s) with 503", grace_s, n)

            self._drain_timer = threading.Timer(grace_s, expire)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    def end_drain(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()


def state_of(request: Request) -> ServerState:
    """The state of the app serving `request` (create_app puts it on `app.state.ragtop`)."""
    return request.app.state.ragtop
