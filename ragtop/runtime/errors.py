"""Errors the engine raises for a request; the server maps each to one HTTP status."""

from __future__ import annotations

from ..errors import RagtopError


class EngineError(RagtopError):
    """A request the engine cannot take; the message names the problem."""


class InvalidRequest(EngineError):
    """Bad sampling parameters or prompt (HTTP 400)."""


class PromptTooLong(InvalidRequest):
    """The prompt does not fit the context limit (HTTP 400); carries the numbers."""

    def __init__(self, prompt_tokens: int, context_limit: int) -> None:
        self.prompt_tokens, self.context_limit = prompt_tokens, context_limit
        super().__init__(
            f"prompt has {prompt_tokens} tokens but the context limit is {context_limit} "
            f"tokens (prompt plus at least one generated token)"
        )


class QueueFull(EngineError):
    """The waiting queue is full (HTTP 429); retry later."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        super().__init__(f"the engine's waiting queue is full ({waiting} requests); retry later")
