"""Operator and helper routes: /health, /metrics, /tokenize, /detokenize."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
    error_responses,
)
from ..serving import ApiError
from ..state import state_of

router = APIRouter()


@router.get("/health", response_model=None,
            responses={200: {"model": HealthResponse, "description": "the engine serves"},
                       503: {"model": HealthResponse,
                             "description": "loading (with what it is doing), draining, or failed (with the error)"}})
async def health(request: Request) -> JSONResponse:
    """200 when the engine serves; 503 while loading (`detail` says what the loader does: on a
    first run, importing or exporting the default model), after a failed load, or when draining."""
    state = state_of(request)
    engine = state.engine
    if state.status == "ready" and engine is not None and engine.error is not None:
        return JSONResponse({"status": "failed", "error": f"the engine loop stopped: {engine.error}"}, status_code=503)
    body = {"status": state.status, **({"error": state.error} if state.error else {}),
            **({"detail": state.detail} if state.status == "loading" and state.detail else {})}
    return JSONResponse(body, status_code=200 if state.status == "ready" else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    m = state_of(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 413, 422, 500, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    serving = state_of(request).ready_serving()
    serving.check_model(body.model)
    if body.messages is not None:
        ids = serving.encode_chat(body.messages, body.add_generation_prompt)
    elif body.add_special_tokens:
        ids = serving.encode_prompt(body.prompt or "")
    else:
        ids = serving.model.tokenizer.encode(body.prompt or "", add_special_tokens=False).ids
    return TokenizeResponse(count=len(ids), max_model_len=serving.context_limit, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404, 413, 422, 500, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    serving = state_of(request).ready_serving()
    serving.check_model(body.model)
    bad = next((t for t in body.tokens if not 0 <= t < serving.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{serving.vocab_size - 1})", param="tokens")
    return DetokenizeResponse(prompt=serving.model.tokenizer.decode(body.tokens, skip_special_tokens=False))
