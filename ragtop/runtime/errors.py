"""Errors the engine raises for a request; the server maps each to one HTTP status."""

from __future__ import annotations

from ..errors import RagtopError


class EngineError(RagtopError):
    """A request the engine cannot take; the message names the problem."""


class InvalidRequest(EngineError):
    """Bad sampling parameters or prompt (HTTP 400); `param` names the field when one is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(InvalidRequest):
    """The prompt does not fit the context limit (HTTP 400); carries the numbers."""

    def __init__(self, prompt_tokens: int, context_limit: int) -> None:
        self.prompt_tokens, self.context_limit = prompt_tokens, context_limit
        super().__init__(
            f"prompt has {prompt_tokens} tokens but the context limit is {context_limit} "
            f"tokens (prompt plus at least one generated token)",
            param="prompt",
        )


class QueueFull(EngineError):
    """The waiting queue is full (HTTP 429); retry later."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        super().__init__(f"the engine's waiting queue is full ({waiting} requests); retry later")


class RequestFailed(EngineError):
    """An accepted request could not be completed: a fault while generating it (HTTP 500), or
    the server shut down before it finished (503). Other requests are not affected."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class SamplingError(RequestFailed):
    """The model's logits for this sequence cannot be sampled (NaN or infinite values)."""


class EngineDead(EngineError):
    """The runner fails even a trivial forward pass: the engine cannot serve anything more.
    A server reports itself unhealthy and exits non-zero so that a supervisor restarts it."""
