"""The serving object: OpenAI requests <-> engine requests.

Routes stay thin; this module tokenizes (and renders the chat template), turns API fields
into `SamplingParams`, queues one engine request per prompt, and turns the engine's
`RequestOutput`s back into OpenAI responses or SSE chunks. It uses only `ragtop.runtime`'s
public API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..runtime import (
    AsyncEngine,
    CompletionDelta,
    EngineDead,
    EngineError,
    InvalidRequest,
    LoadedModel,
    QueueFull,
    Request,
    RequestFailed,
    RequestOutput,
    SamplingParams,
)
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)

log = logging.getLogger("ragtop.server")


class ApiError(Exception):
    """An error the client caused or must react to; becomes an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    @classmethod
    def internal(cls, e: BaseException) -> ApiError:
        """A fault of ragtop's, named without a traceback (the log has it)."""
        return cls(500, f"internal server error ({type(e).__name__}); the server log has the details", "server_error")

    @classmethod
    def of_failure(cls, e: RequestFailed) -> ApiError:
        """An accepted request that could not be completed: 500 (a fault), 503 (shutdown)."""
        return cls(e.status, str(e), "service_unavailable" if e.status == 503 else "server_error")


@dataclass
class _Choice:
    """What accumulates for one choice of a non-streaming response."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class OpenAIServing:
    def __init__(
        self, model: LoadedModel, engine: AsyncEngine, model_name: str, context_limit: int, retry_after_s: int = 1
    ) -> None:
        self.model, self.engine, self.model_name = model, engine, model_name
        self.context_limit, self.retry_after_s = context_limit, retry_after_s
        self.vocab_size = model.runner.spec.vocab_size
        self.created = int(time.time())
        template = model.generation.get("chat_template")
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(template)

    # -- tokenization ---------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        return self.model.tokenizer.decode([token], skip_special_tokens=False)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.model.encode(prompt)
        return [int(t) for t in prompt]

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ApiError(400, f"model {self.model_name!r} has no chat template; use /v1/completions")
        tok = self.model.tokenizer
        gen = self.model.generation
        special = {
            k: tok.id_to_token(gen[f"{k}_id"]) for k in ("bos_token", "eos_token") if gen.get(f"{k}_id") is not None
        }
        try:
            msgs = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **special)
        except TemplateError as e:
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None

    def encode_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        # The template writes every special token itself: no bos is added.
        return self.model.tokenizer.encode(
            self.render_chat(messages, add_generation_prompt), add_special_tokens=False
        ).ids

    # -- /tokenize, /detokenize ---------------------------------------------------------------
    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """A prompt (special tokens as a completion adds them, or none) or chat messages
        (rendered with the template) as token ids, with the context they must fit."""
        self.check_model(body.model)
        if body.messages is not None:
            ids = self.encode_chat(body.messages, body.add_generation_prompt)
        elif body.add_special_tokens:
            ids = self.encode_prompt(body.prompt or "")
        else:
            ids = self.model.tokenizer.encode(body.prompt or "", add_special_tokens=False).ids
        return TokenizeResponse(count=len(ids), max_model_len=self.context_limit, tokens=ids)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids as text, special tokens included; an id outside the vocabulary is a 400."""
        self.check_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param="tokens")
        return DetokenizeResponse(prompt=self.model.tokenizer.decode(body.tokens, skip_special_tokens=False))

    # -- request -> engine --------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
                "model",
            )

    def sampling_params(
        self, req: SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        room = self.context_limit - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens but the context limit is {self.context_limit} "
                f"tokens (prompt plus at least one generated token)",
                param="prompt",
            )
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise ApiError(
                400,
                f"this model's context limit is {self.context_limit} tokens, but {prompt_len + max_tokens} "
                f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion); "
                f"lower max_tokens to {room} or less",
                param="max_tokens",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            stop=tuple(req.stop or ()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            min_tokens=min(req.min_tokens, max_tokens),
            logprobs=logprobs,
            n=req.n,
            logit_bias=req.logit_bias or {},
        )

    async def submit(
        self,
        rid: str,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        speculative_tokens: int | None = None,
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queue one engine request per prompt; all of them or none (a refusal aborts the rest).
        The engine owns the checks that need the model (token ids in the vocabulary, the
        context); its refusals become 400 / 429 / 503 here, naming the field."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                streams.append(await self.engine.generate(Request(f"{rid}-{i}", ids, p, speculative_tokens)))
        except BaseException as e:
            for s in streams:
                await s.aclose()  # leaving the stream aborts its request
            if isinstance(e, QueueFull):
                raise ApiError(
                    429, str(e), "rate_limit_error", headers={"Retry-After": str(self.retry_after_s)}
                ) from None
            if isinstance(e, InvalidRequest):
                raise ApiError(400, str(e), param=e.param) from None
            if isinstance(e, EngineDead):
                raise ApiError(503, str(e), "service_unavailable") from None
            if isinstance(e, EngineError):
                raise ApiError(500, str(e), "server_error") from None
            raise
        log.info(
            "request %s: %d prompt(s), %s prompt tokens, max_tokens %d, n %d",
            rid,
            len(prompts),
            "+".join(str(len(p)) for p in prompts),
            params[0].max_tokens,
            params[0].n,
        )
        return streams

    # -- /v1/completions ------------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts: list[Any] = [p]
        elif all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        return [self.encode_prompt(x) for x in prompts]  # empty / out-of-vocabulary: the engine says 400

    async def completions(
        self, req: CompletionRequest
    ) -> tuple[str, list[list[int]], list[AsyncIterator[RequestOutput]]]:
        self.check_model(req.model)
        prompts = self.completion_prompts(req)
        params = [self.sampling_params(req, len(ids), req.max_tokens, req.logprobs) for ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        return rid, prompts, await self.submit(rid, prompts, params, req.num_speculative_tokens)

    async def completion_response(
        self, rid: str, prompts: list[list[int]], streams: list[AsyncIterator[RequestOutput]], req: CompletionRequest
    ) -> dict[str, Any]:
        choices, usage = await _collect(streams, req.n)  # RequestFailed -> ApiError
        out = []
        for index, c in sorted(choices.items()):
            prefix = self._echo_text(req, index // req.n, prompts) if req.echo else ""
            out.append(
                {
                    "index": index,
                    "text": prefix + "".join(c.text),
                    "logprobs": self._completion_logprobs(c.logprobs, len(prefix))
                    if req.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": out,
            "usage": usage,
        }

    def completion_stream(
        self, rid: str, prompts: list[list[int]], streams: list[AsyncIterator[RequestOutput]], req: CompletionRequest
    ) -> AsyncIterator[str]:
        return _ending_cleanly(rid, self._completion_chunks(rid, prompts, streams, req))

    async def _completion_chunks(
        self, rid: str, prompts: list[list[int]], streams: list[AsyncIterator[RequestOutput]], req: CompletionRequest
    ) -> AsyncIterator[str]:
        chunk = _chunker(rid, "text_completion", self.model_name)

        offsets: dict[int, int] = {}
        if req.echo:
            for i in range(len(prompts)):
                text = self._echo_text(req, i, prompts)
                for j in range(req.n):
                    offsets[i * req.n + j] = len(text)
                    yield chunk([{"index": i * req.n + j, "text": text, "logprobs": None, "finish_reason": None}])
        usage = _UsageSum()
        async for i, out in _merge(streams):
            for d in out.deltas:
                if not d.text and not d.finish_reason:
                    continue
                index = i * req.n + d.index
                lp = None
                if req.logprobs is not None and d.logprobs:
                    lp = self._completion_logprobs(d.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(self.token_text(t.token)) for t in d.logprobs)
                yield chunk(
                    [
                        {
                            "index": index,
                            "text": d.text,
                            "logprobs": lp,
                            "finish_reason": d.finish_reason,
                            "stop_reason": d.stop_reason,
                        }
                    ]
                )
            usage.add(out)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage.body())
        yield "data: [DONE]\n\n"

    def _echo_text(self, req: CompletionRequest, i: int, prompts: list[list[int]]) -> str:
        """The prompt as the client sent it (text), or its ids decoded."""
        if isinstance(req.prompt, str):
            return req.prompt
        if isinstance(req.prompt[0], str):
            return req.prompt[i]  # type: ignore[return-value]
        return self.model.tokenizer.decode(prompts[i], skip_special_tokens=False)

    def _completion_logprobs(self, logprobs: Sequence[Any], offset: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for t in logprobs:
            text = self.token_text(t.token)
            tokens.append(text)
            token_lps.append(t.logprob)
            tops.append({self.token_text(tok): lp for tok, lp in t.top} if t.top else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # -- /v1/chat/completions -----------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> tuple[str, list[int], list[AsyncIterator[RequestOutput]]]:
        self.check_model(req.model)
        ids = self.encode_chat(req.messages, req.add_generation_prompt)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, len(ids), req.max_new_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return rid, ids, await self.submit(rid, [ids], [params], req.num_speculative_tokens)

    async def chat_response(
        self, rid: str, streams: list[AsyncIterator[RequestOutput]], req: ChatCompletionRequest
    ) -> dict[str, Any]:
        choices, usage = await _collect(streams, req.n)  # RequestFailed -> ApiError
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for i, c in sorted(choices.items())
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": out,
            "usage": usage,
        }

    def chat_stream(
        self, rid: str, streams: list[AsyncIterator[RequestOutput]], req: ChatCompletionRequest
    ) -> AsyncIterator[str]:
        return _ending_cleanly(rid, self._chat_chunks(rid, streams, req))

    async def _chat_chunks(
        self, rid: str, streams: list[AsyncIterator[RequestOutput]], req: ChatCompletionRequest
    ) -> AsyncIterator[str]:
        chunk = _chunker(rid, "chat.completion.chunk", self.model_name)

        for i in range(req.n):  # OpenAI opens each choice with the role
            yield chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        usage = _UsageSum()
        async for _, out in _merge(streams):
            for d in out.deltas:
                if not d.text and not d.finish_reason:
                    continue
                lp = {"content": self._chat_logprobs(d.logprobs or ())} if req.logprobs else None
                delta = {"content": d.text} if d.text else {}
                yield chunk(
                    [
                        {
                            "index": d.index,
                            "delta": delta,
                            "logprobs": lp,
                            "finish_reason": d.finish_reason,
                            "stop_reason": d.stop_reason,
                        }
                    ]
                )
            usage.add(out)
        if req.stream_options and req.stream_options.include_usage and usage.seen:
            yield chunk([], usage.body())
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, logprobs: Sequence[Any]) -> list[dict[str, Any]]:
        def entry(token: int, lp: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return [{**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]} for t in logprobs]


# -- helpers -----------------------------------------------------------------------------------
def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunker(rid: str, obj: str, model: str):
    """SSE chunks of one stream: the same id, object and creation time on every chunk."""
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    return chunk


async def _ending_cleanly(rid: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE stream that always ends with `data: [DONE]`: if the request fails once the
    response has begun (a fault, or the shutdown grace period ran out), the client gets an
    OpenAI-style error event first (the openai client raises it as an APIError)."""
    try:
        async for c in chunks:
            yield c
    except RequestFailed as e:
        log.warning("request %s failed while streaming: %s", rid, e)
        yield _sse(ApiError.of_failure(e).body())
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - a fault of ours: logged, reported without a traceback
        log.error("request %s: internal error while streaming", rid, exc_info=e)
        yield _sse(ApiError.internal(e).body())
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()


async def _merge(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests as they come, tagged with the stream's index.
    Leaving early (client gone) closes every stream, which aborts their requests."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


@dataclass
class _UsageSum:
    """Usage over a response's engine requests, as OpenAI reports it (with the prompt tokens
    served from the prefix cache in `prompt_tokens_details.cached_tokens`)."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    seen: bool = False

    def add(self, out: RequestOutput) -> None:
        if out.usage is not None:
            self.prompt += out.usage.prompt_tokens
            self.completion += out.usage.completion_tokens
            self.cached += out.usage.cached_tokens
            self.seen = True

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


async def _collect(
    streams: Sequence[AsyncIterator[RequestOutput]], n: int
) -> tuple[dict[int, _Choice], dict[str, Any]]:
    choices: dict[int, _Choice] = {}
    usage = _UsageSum()
    try:
        async for i, out in _merge(streams):
            for d in out.deltas:
                _add(choices.setdefault(i * n + d.index, _Choice()), d)
            usage.add(out)
    except RequestFailed as e:
        raise ApiError.of_failure(e) from e
    return choices, usage.body()


def _add(c: _Choice, d: CompletionDelta) -> None:
    c.text.append(d.text)
    c.token_ids.extend(d.token_ids)
    if d.logprobs:
        c.logprobs.extend(d.logprobs)
    if d.finish_reason:
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
