"""Sampling parameters and the per-sequence sampler.

Order of operations (as vLLM): logit bias and min_tokens suppression -> repetition,
presence and frequency penalties -> greedy argmax, or temperature -> top-k -> top-p ->
min-p -> a draw from the sequence's own `torch.Generator`. One generator per sequence makes
a seeded request reproducible whatever else shares its batch.

Logprobs are those of the model's raw distribution (log-softmax of the logits before any
processing), with the `logprobs` most likely alternatives.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import InvalidRequest

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation (OpenAI / vLLM names and defaults)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k: the chosen token plus k alternatives
    n: int = 1
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequest naming the first bad field."""
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.min_tokens <= self.max_tokens, f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)
        bad = [t for t in (*self.stop_token_ids, *self.logit_bias) if not 0 <= int(t) < vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: float | None = None  # None when the request asked for no logprobs
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


class SequenceSampler:
    """Sampling state of one sequence: its generator and the token counts penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 eos_ids: Iterable[int] = (), seed: int | None = None) -> None:
        self.params, self.vocab_size = params, vocab_size
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self.suppress_early = sorted({*eos_ids, *params.stop_token_ids})  # before min_tokens
        self.counts = torch.zeros(vocab_size, dtype=torch.float32)  # generated tokens
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool)
        if params.repetition_penalty != 1.0 and len(prompt_ids):
            self.in_prompt[torch.as_tensor(list(prompt_ids), dtype=torch.long)] = True
        self.generated = 0

    def fork(self, seed: int | None) -> SequenceSampler:
        """A sibling sequence (n > 1): same prompt state, its own generator."""
        other = SequenceSampler(self.params, (), self.vocab_size, seed=seed)
        other.suppress_early, other.in_prompt = self.suppress_early, self.in_prompt
        other.counts, other.generated = self.counts.clone(), self.generated
        return other

    def sample(self, logits: Tensor) -> SampledToken:
        """logits: [V] float -> the next token (and its logprobs when asked)."""
        p = self.params
        x = self.process(logits)
        if p.greedy:
            token = int(x.argmax())
        else:
            probs = torch.softmax(self.truncate(x / p.temperature), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.accept(token)
        if p.logprobs is None:
            return SampledToken(token)
        raw = torch.log_softmax(logits.float(), dim=-1)
        top = raw.topk(p.logprobs) if p.logprobs else None
        alternatives = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        return SampledToken(token, float(raw[token]), alternatives)

    def accept(self, token: int) -> None:
        self.counts[token] += 1
        self.generated += 1

    def process(self, logits: Tensor) -> Tensor:
        """Bias, min_tokens suppression and penalties; returns a new tensor when changed."""
        p = self.params
        x = logits.float()
        if p.logit_bias:
            x = x.clone()
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            x[ids] += torch.tensor(list(p.logit_bias.values()), dtype=x.dtype)
        if self.generated < p.min_tokens and self.suppress_early:
            x = x.clone() if x is logits else x
            x[self.suppress_early] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = self.in_prompt | (self.counts > 0)
            x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        if p.presence_penalty or p.frequency_penalty:
            x = x - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return x

    def truncate(self, x: Tensor) -> Tensor:
        """top-k, top-p and min-p: tokens left out get -inf (the best token always stays)."""
        p = self.params
        if p.top_k > 0 and p.top_k < x.numel():
            kth = x.topk(p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            drop_sorted = probs.cumsum(-1) - probs > p.top_p  # mass before this token already > top_p
            x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
        if p.min_p > 0.0:
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return x
