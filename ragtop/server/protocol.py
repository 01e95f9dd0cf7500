"""OpenAI-compatible request and response bodies (pydantic), plus vLLM's sampling extras.

Requests validate their fields here (HTTP 422 naming the field on failure): types, ranges,
numbers that must be finite (JSON's NaN / Infinity extensions are refused), text that must
be valid Unicode (no lone surrogates such as "\\ud800"), canonical token-id keys. What depends
on the model or on the engine's own contract (token ids in the vocabulary, the context
length, the seed range with n) is checked once, by the engine (400, naming the field).
Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..runtime import MAX_LOGPROBS, MAX_SPECULATIVE_TOKENS

MAX_N = 16
TOKEN_ID_KEY = re.compile(r"-?(0|[1-9][0-9]{0,18})")  # a token id as JSON object keys carry it


def valid_unicode(text: str) -> str:
    """Text that can be encoded (a JSON string may carry a lone surrogate such as \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text must be valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The sampling fields both endpoints share (OpenAI's plus vLLM's extras)."""

    model: Text | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    seed: int | None = None  # range (with n): checked by the engine, 400 naming "seed"
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # ragtop's extra (vLLM's --num-speculative-tokens, per request): self-speculative decoding
    # of a greedy request, output identical to dense; 0 = off, None = the server's default
    num_speculative_tokens: Annotated[int, Field(ge=0, le=MAX_SPECULATIVE_TOKENS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[int, float] | None:
        """Keys are token ids written in decimal ("42"); returns them as ints."""
        if v is None:
            return None
        for key in v:
            if not TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids written as decimal integers, got {key!r}")
        return {int(k): b for k, b in v.items()}

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: int | None = None
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs (prompt logprobs) is not supported")
        return self


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None

    def text(self) -> str:
        """The message's text; content parts other than text (or not valid Unicode) are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
            out.append(valid_unicode(str(part.get("text", ""))))
        return "".join(out)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools:
            raise ValueError("tools (function calling) are not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int]


# -- responses (plain dicts would do; these document the shapes in /docs) -------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ragtop"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthResponse(BaseModel):
    status: Literal["loading", "ready", "failed", "draining"]
    error: str | None = None
    detail: str | None = None  # while loading: what the server is doing ("exporting ... to ONNX")


_ERROR_WHEN = {
    400: "a request the model cannot take (token ids outside the vocabulary, a prompt longer than the context, "
    "a seed out of range, a chat template that refuses the messages) or a body that cannot be parsed",
    401: "missing or wrong API key (when the server has one)",
    404: "no such model (or route)",
    413: "the request body is larger than the server's limit",
    422: "a field has the wrong type or value; `param` names it",
    429: "the waiting queue is full; retry after Retry-After seconds",
    500: "the request failed inside the server (the other requests go on); the log has the details",
    503: "the server is loading, shutting down (Retry-After) or has failed",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these statuses, each with OpenAI's error body."""
    return {code: {"model": ErrorResponse, "description": _ERROR_WHEN[code]} for code in codes}


def generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A completion route: JSON, or (stream: true) Server-Sent Events ending with `data: [DONE]`."""
    sse = {
        "schema": {
            "type": "string",
            "description": "`data: {chunk}` events, then `data: [DONE]`; a request "
            'that fails mid-stream sends `data: {"error": {...}}` first',
        }
    }
    return {
        200: {
            "model": model,
            "description": "the completion (JSON), or its chunks as Server-Sent Events",
            "content": {"text/event-stream": sse},
        },
        **error_responses(400, 401, 404, 413, 422, 429, 500, 503),
    }
