"""Ray Serve's HTTP proxy, made to speak OpenAI errors: an ASGI middleware for the proxy.

The replicas answer with ragtop's own OpenAI-shaped errors; the proxy has a few of its own,
in plain text: 429 when its queue is full (`max_queued_requests`), 503 when no replica is up,
408 on its request timeout, and, when the replica serving a request dies, a bare 500 or a
stream cut off mid-body. This middleware, run inside every proxy, turns them into what an
OpenAI client understands:

- a plain-text error of the proxy becomes `{"error": {"message", "type", "param", "code"}}`
  with the same status and Retry-After;
- a request whose replica died before it sent anything (a non-streaming request, or a stream
  not started yet) is sent again (twice at most) to a live replica (the request body is kept for it);
  after that it gets a 503 with Retry-After;
- an SSE stream whose replica died mid-way ends with an error event,
  `data: {"error": {...}}`, which the openai client raises as an APIError, instead of a
  truncated body.

Ray 2.60 installs proxy middlewares only through an import path in the environment of the
Ray processes (`ragtop serve --replicas` sets it before it starts Ray; on a cluster see
docs/scale-out.md):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ragtop.server.ray_proxy:proxy_middlewares

This module imports neither ray nor the rest of ragtop: it loads into the proxy actor alone.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ragtop.server")

CALLBACK = "ragtop.server.ray_proxy:proxy_middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_ERRORS = {
    408: "timeout_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}
RETRIED_HEADER = "x-ragtop-retried"  # on a response that a second replica gave
REPLICA_FAILED = "the replica serving this request failed"


def proxy_middlewares() -> list[Middleware]:
    """The callback Ray's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(OpenAIProxyErrors)]


def error_body(status: int, message: str, type_: str | None = None) -> bytes:
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": type_ or PROXY_ERRORS.get(status, "server_error"),
                "param": None,
                "code": status,
            }
        }
    ).encode()


class _Attempt:
    """What one pass through the proxy sent (or held back) of the response."""

    def __init__(self, send: Send, retried: bool = False) -> None:
        self.send, self.retried = send, retried
        self.started = self.finished = self.sse = False
        self.held: tuple[int, list] | None = None  # a plain-text error of the proxy, being rewritten
        self.held_body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers") or []
            ctype = next((bytes(v) for k, v in headers if bytes(k).lower() == b"content-type"), b"")
            if message["status"] in PROXY_ERRORS and ctype.startswith(b"text/plain"):
                self.held = (message["status"], headers)
                return
            self.sse = ctype.startswith(b"text/event-stream")
            self.started = True
            if self.retried:
                message = {**message, "headers": [*headers, (RETRIED_HEADER.encode(), b"1")]}
        elif message["type"] == "http.response.body":
            if self.held is not None:
                self.held_body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_held()
                return
            if not message.get("more_body", False):
                self.finished = True
        await self.send(message)

    async def _send_held(self) -> None:
        status, headers = self.held  # type: ignore[misc]
        text = b"".join(self.held_body).decode(errors="replace").strip() or "the request failed in Ray Serve's proxy"
        keep = [(k, v) for k, v in headers if bytes(k).lower() not in (b"content-type", b"content-length")]
        await send_json(self.send, status, error_body(status, text), keep)
        self.started = self.finished = True


async def send_json(send: Send, status: int, body: bytes, headers: list | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class OpenAIProxyErrors:
    def __init__(self, app: ASGIApp, retries: int = 2, max_body_bytes: int = 4 << 20, retry_after_s: int = 1) -> None:
        self.app, self.retries, self.max_body_bytes, self.retry_after_s = app, retries, max_body_bytes, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/-/"):  # Ray's own routes
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size, more = 0, True
        while more and size <= self.max_body_bytes:  # kept for a retry
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        retries = self.retries if not more else 0  # a body too large to keep is sent once
        disconnected = False

        for attempt in range(retries + 1):
            replayed = False

            async def replay() -> Message:
                nonlocal replayed, disconnected
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": more}
                message = await receive()
                disconnected = disconnected or message["type"] == "http.disconnect"
                return message

            sent = _Attempt(send, retried=attempt > 0)
            error: BaseException | None = None
            try:
                await self.app(scope, replay, sent)
            except Exception as e:  # noqa: BLE001 - the proxy failed this request; answered below
                error = e
            if sent.finished or disconnected:
                return
            reason = f"{REPLICA_FAILED}{f': {error}' if error else ''}"
            if sent.started:  # cut off mid-response: only a stream can still say why
                if sent.sse:
                    body = b"data: " + error_body(502, f"{reason}; the stream ends here", "server_error") + b"\n\n"
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if attempt < retries:
                log.warning("%s %s: %s; sending it to another replica", scope.get("method"), scope["path"], reason)
                await asyncio.sleep(0.1)
        await send_json(
            send, 503, error_body(503, f"{reason}; retry shortly"), [(b"retry-after", str(self.retry_after_s).encode())]
        )
