"""A fake OpenAI-compatible SSE server on a real socket (uvicorn, port 0) with scripted
timings, so the client's measurements can be checked against known delays."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


@dataclass
class Script:
    ttft: float = 0.05  # seconds before the first token
    itl: float = 0.01  # seconds between tokens
    capacity: int = 1000  # requests in flight before 429
    empty_first_chunk: bool = True
    in_flight: int = 0
    bodies: list = field(default_factory=list)
    decode_tokens: float = 0.0
    decode_seconds: float = 0.0


def make_app(script: Script) -> Starlette:
    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def tokenize(request: Request):
        body = await request.json()
        tokens = [ord(c) % 256 for c in body["prompt"]]
        return JSONResponse({"tokens": tokens, "count": len(tokens)})

    async def metrics(_: Request):
        return PlainTextResponse(
            "# TYPE ragtop:decode_tokens_total counter\n"
            f'ragtop:decode_tokens_total{{context_bucket="0-1k",attention="dense"}} {script.decode_tokens}\n'
            "# TYPE ragtop:decode_seconds_total counter\n"
            f'ragtop:decode_seconds_total{{context_bucket="0-1k",attention="dense"}} {script.decode_seconds}\n'
            "# TYPE ragtop:generation_tokens_total counter\n"
            f"ragtop:generation_tokens_total {script.decode_tokens}\n"
        )

    async def completions(request: Request):
        body = await request.json()
        script.bodies.append(body)
        if script.in_flight >= script.capacity:
            return JSONResponse(
                {"error": {"message": "the waiting queue is full", "type": "rate_limit", "param": None, "code": 429}},
                status_code=429,
                headers={"Retry-After": "1"},
            )
        script.in_flight += 1
        n = body["max_tokens"]

        async def events():
            try:
                if script.empty_first_chunk:  # a role-only / empty chunk: must not count as the first token
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": ""}]}) + "\n\n"
                await asyncio.sleep(script.ttft)
                t = time.perf_counter()
                for i in range(n):
                    if i:
                        await asyncio.sleep(script.itl)
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}) + "\n\n"
                script.decode_tokens += n - 1
                script.decode_seconds += time.perf_counter() - t
                yield (
                    "data: "
                    + json.dumps(
                        {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}}
                    )
                    + "\n\n"
                )
                yield "data: [DONE]\n\n"
            finally:
                script.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/metrics", metrics),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


@dataclass
class Fake:
    url: str
    script: Script


@pytest.fixture
def fake_server() -> Iterator[Fake]:
    script = Script()
    server = uvicorn.Server(uvicorn.Config(make_app(script), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Fake(f"http://127.0.0.1:{port}", script)
    server.should_exit = True
    thread.join(timeout=10)
