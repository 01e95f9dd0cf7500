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
from ..state import state_of

router = APIRouter()


@router.get(
    "/health",
    response_model=None,
    responses={
        200: {"model": HealthResponse, "description": "the engine serves"},
        503: {
            "model": HealthResponse,
            "description": "loading (with what it is doing), draining, or failed (with the error)",
        },
    },
)
async def health(request: Request) -> JSONResponse:
    """200 when the engine serves; 503 while loading (`detail` says what the loader does: on a
    first run, importing or exporting the default model), after a failed load, or when draining."""
    state = state_of(request)
    engine = state.engine
    if state.status == "ready" and engine is not None and engine.error is not None:
        return JSONResponse({"status": "failed", "error": f"the engine loop stopped: {engine.error}"}, status_code=503)
    body = {
        "status": state.status,
        **({"error": state.error} if state.error else {}),
        **({"detail": state.detail} if state.status == "loading" and state.detail else {}),
    }
    return JSONResponse(body, status_code=200 if state.status == "ready" else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request) -> Response:
    m = state_of(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 413, 422, 500, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return state_of(request).ready_serving().tokenize(body)


@router.post(
    "/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404, 413, 422, 500, 503)
)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return state_of(request).ready_serving().detokenize(body)
