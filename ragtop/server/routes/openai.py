"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    error_responses,
    generation_responses,
)
from ..state import state_of

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, it only marks the log line


@router.post("/v1/completions", response_model=None, responses=generation_responses(CompletionResponse))
async def completions(body: CompletionRequest, request: Request) -> Response:
    serving = state_of(request).ready_serving()
    rid, prompts, streams = await serving.completions(body)
    if body.stream:
        return _sse(serving.completion_stream(rid, prompts, streams, body))
    return await _unless_disconnected(request, serving.completion_response(rid, prompts, streams, body))


@router.post("/v1/chat/completions", response_model=None, responses=generation_responses(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    serving = state_of(request).ready_serving()
    rid, _, streams = await serving.chat(body)
    if body.stream:
        return _sse(serving.chat_stream(rid, streams, body))
    return await _unless_disconnected(request, serving.chat_response(rid, streams, body))


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 500, 503))
async def models(request: Request) -> ModelList:
    state = state_of(request)
    serving = state.ready_serving()
    card = ModelCard(
        id=serving.model_name,
        created=serving.created,
        root=str(state.settings.model),
        max_model_len=serving.context_limit,
    )
    return ModelList(data=[card])


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    # Starlette cancels this iterator when the client disconnects; closing it aborts the request.
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


async def _unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]) -> Response:
    """Await a non-streaming response, abandoning it (and aborting its requests) when the
    client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return JSONResponse(task.result())
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return Response(status_code=CLIENT_CLOSED)
    except asyncio.CancelledError:  # the handler itself was cancelled (Ray Serve's proxy does so on disconnect)
        task.cancel()
        raise
