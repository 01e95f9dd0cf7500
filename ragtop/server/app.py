"""`create_app(settings)`: the FastAPI application and its lifespan.

The model loads in a background thread when the app starts, so the port answers at once:
`/health` says 503 while loading (and after a failed load), 200 when the engine runs. A
`prepare` step (the default model's first-run import and export, minutes) runs in that thread
too, before the load; while it runs /health and the API answer 503 `loading` with what it is
doing (`detail`). The
engine loop runs in its own thread (AsyncEngine); handlers only queue requests and await
their outputs, so the event loop never waits for a forward pass.

Every error a client sees has OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`: bad fields (422), body parse errors (400), unknown routes (404), and any
unexpected fault (500, logged with its traceback, never sent). If the engine dies (its
runner is broken) the status becomes "failed" and each `on_failure` callback runs: `ragtop
serve` then exits non-zero so that a supervisor restarts it. `begin_drain(grace)` (SIGTERM)
refuses new requests with 503 + Retry-After and, when the grace period runs out, ends every
request still open with a 503 (a stream with an error event and `[DONE]`).

    uvicorn.run(create_app(ServerSettings(model=Path("runs/smollm2-onnx"))))
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..runtime import AsyncEngine, EngineConfig, LoadedModel, SchedulerConfig, load_model
from .docs import mount_docs
from .metrics import ServerMetrics
from .serving import ApiError, OpenAIServing
from .settings import ServerSettings
from .state import ServerState

log = logging.getLogger("ragtop.server")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# Resolves the model folder before the load (e.g. importing and exporting the default model on
# first run), calling its argument with a line saying what it is doing at each stage.
Prepare = Callable[[Callable[[str], None]], Path]


def engine_config(s: ServerSettings) -> EngineConfig:
    return EngineConfig(
        SchedulerConfig(
            max_batch_size=s.max_batch_size,
            max_tokens_per_step=s.max_tokens_per_step,
            prefill_chunk=s.prefill_chunk,
            max_waiting=s.max_waiting,
        ),
        context_limit=s.context_limit,
        cache_memory_bytes=None if s.cache_memory_mb is None else s.cache_memory_mb << 20,
        prefix_caching=s.prefix_caching,
        speculative_tokens=s.speculative_tokens,
        dense_prefill_tokens=s.dense_prefill_tokens,
        dense_decode_tokens=s.dense_decode_tokens,
    )


def _load(state: ServerState, prepare: Prepare | None = None) -> None:
    """The loading thread: the model folder (`prepare`), model, engine, serving object; then status 'ready'."""
    s = state.settings
    try:
        if prepare is not None:
            s = state.settings = dataclasses.replace(s, model=prepare(state.progress))
        if s.model is None:
            raise ApiError(500, "no model given (ragtop serve MODEL_DIR, or RAGTOP_MODEL)")
        state.progress(f"loading the model from {s.model}")
        paged = {"auto": None, "paged": True, "contiguous": False}[s.kv_cache]  # None: paged when the folder can
        model: LoadedModel = load_model(s.model, s.runner, threads=s.threads, use_plugin=s.plugin, paged=paged)  # type: ignore[arg-type]
        engine = model.engine(engine_config(s))
        engine.stats_listeners.append(state.metrics.observe)
        plan = engine.cache_plan
        if plan.shrunk_from:
            log.warning(
                "KV-cache memory holds one sequence of %d tokens, not %d: serving with the smaller context",
                plan.context_limit,
                plan.shrunk_from,
            )
        state.engine = AsyncEngine(engine)
        state.engine.on_fatal.append(lambda e: state.fail(f"the engine stopped: {e}"))
        state.engine.start()
        state.serving = OpenAIServing(model, state.engine, s.model_name, engine.context_limit, s.retry_after_s)
        spec = model.runner.spec
        log.info(
            "serving %s as %r: runner %s, attention %s, plugin %s, context %d, %d slots, KV cache %.1f MiB%s",
            s.model,
            s.model_name,
            spec.name,
            spec.attention,
            getattr(model.runner, "plugin", "n/a"),
            plan.context_limit,
            plan.slots,
            plan.total_bytes / 2**20,
            f" in {engine.cache.pages.num_pages} pages of {spec.page_size} tokens" if spec.page_size else "",
        )
        if state.status == "loading":
            state.status, state.detail = "ready", None
    except Exception as e:  # noqa: BLE001 - reported on /health and to the CLI
        state.fail(f"the model failed to load: {str(e) or type(e).__name__}")


def create_app(
    settings: ServerSettings, metrics: ServerMetrics | None = None, prepare: Prepare | None = None
) -> FastAPI:
    """The app; `prepare` (optional) yields the model folder in the loading thread, so the port
    is open, answering 503 `loading`, while it runs (`settings.model` is then ignored)."""
    state = ServerState(settings, metrics or ServerMetrics(settings.model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load, args=(state, prepare), name="ragtop-load", daemon=True)
        loader.start()
        yield
        if state.status != "failed":
            state.status = "draining"
        state.end_drain()
        if state.engine is not None:
            await state.engine.shutdown()

    app = FastAPI(
        title="ragtop",
        version=_version(),
        description="OpenAI-compatible completions over top-k sparse attention and ragged embeddings. "
        'Every error has the shape {"error": {"message", "type", "param", "code"}}.',
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ragtop = state
    mount_docs(app)  # the pages' assets from the package, never a CDN

    from .routes import openai, utility

    app.include_router(openai.router)
    app.include_router(utility.router)

    def respond(e: ApiError) -> JSONResponse:
        """Every error response: counted by status, in OpenAI's shape."""
        state.metrics.refused(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return respond(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            err = ApiError(
                422,
                f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')} "
                f"(at character {first.get('loc', (None, '?'))[-1]})",
            )
        else:
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            param = ".".join(loc) or None
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            err = ApiError(422, f"{param}: {msg}" if param else msg, param=param)
        return respond(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route, wrong method, unparseable body) in OpenAI's shape."""
        message = str(e.detail)
        if e.status_code == 400 and message == "There was an error parsing the body":
            message = (
                "the request body could not be parsed: it must be JSON text in UTF-8, "
                "nested at most a few hundred levels"
            )
        elif e.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the API"
        return respond(
            ApiError(
                e.status_code,
                message,
                "not_found_error" if e.status_code == 404 else "invalid_request_error",
                headers=getattr(e, "headers", None),
            )
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        """A fault of ragtop's: logged with its traceback, answered without it."""
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return respond(ApiError.internal(e))

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, state=state)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, state=state)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ragtop")
    except PackageNotFoundError:
        return "0"


async def _send_error(send: Send, e: ApiError) -> None:
    import json

    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes: by Content-Length, or, for a chunked body,
    by reading it (up to the limit) before the app sees it."""

    def __init__(self, app: ASGIApp, limit: int, state: ServerState) -> None:
        self.app, self.limit, self.state = app, limit, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._refuse(send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        self.state.metrics.refused(413)
        await _send_error(send, ApiError(413, f"the request body is larger than the limit of {self.limit} bytes"))


class ApiKeyMiddleware:
    """With an API key set, the OpenAI routes and tokenizer routes need `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str | None, state: ServerState) -> None:
        self.app, self.state = app, state
        self.expected = None if not api_key else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.expected is None
            or scope["type"] != "http"
            or scope.get("method") == "OPTIONS"
            or not scope["path"].startswith(PROTECTED_PREFIXES)
        ):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not secrets.compare_digest(given, self.expected):
            self.state.metrics.refused(401)
            what = "missing" if not given else "wrong"
            return await _send_error(
                send,
                ApiError(
                    401,
                    f"{what} API key: send the header 'Authorization: Bearer <key>'",
                    "authentication_error",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
        return await self.app(scope, receive, send)
