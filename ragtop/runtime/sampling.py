"""Sampling parameters and the per-sequence sampler (numpy: no torch on the serving path).

Order of operations (as vLLM): logit bias and min_tokens suppression -> repetition,
presence and frequency penalties -> greedy argmax, or top-k -> temperature -> top-p ->
min-p -> a draw from the sequence's own generator (numpy PCG64). One generator per sequence
makes a seeded request reproducible whatever else shares its batch.

The sampler is total over the parameters `SamplingParams.validate` accepts: processing runs
in float64, a temperature so small (or a penalty so large) that the scaled logits overflow
leaves the distribution on the best tokens (the limit of softmax as T -> 0), and if every
token is suppressed the raw argmax is taken. Only logits that are themselves NaN or infinite
(a fault of the model) raise `SamplingError`, which fails that one sequence.

Logprobs are those of the model's raw distribution (log-softmax of the logits before any
processing), with the `logprobs` most likely alternatives.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidRequest, SamplingError

MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # the OpenAI / vLLM seed range (a signed 64-bit integer)


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
    seed: int | None = None  # sequence i of n > 1 uses seed + i
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
        """Raise InvalidRequest naming the first bad field (`param`)."""
        finite = math.isfinite
        checks = [
            ("max_tokens", self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (
                "temperature",
                finite(self.temperature) and self.temperature >= 0.0,
                f"temperature must be >= 0 and finite, got {self.temperature}",
            ),
            ("top_p", 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            ("top_k", self.top_k >= -1, f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}"),
            ("min_p", 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                "repetition_penalty",
                finite(self.repetition_penalty) and self.repetition_penalty > 0.0,
                f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}",
            ),
            (
                "presence_penalty",
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                "frequency_penalty",
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            ("min_tokens", self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                "min_tokens",
                self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
            ),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            ),
            ("n", self.n >= 1, f"n must be >= 1, got {self.n}"),
            (
                "seed",
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1),
                f"seed must be a signed 64-bit integer ({SEED_MIN}..{SEED_MAX}) and seed + n - 1 must be "
                f"one too, got seed {self.seed} with n {self.n}",
            ),
            ("stop", all(s for s in self.stop), "stop strings must not be empty"),
            (
                "logit_bias",
                all(finite(float(b)) for b in self.logit_bias.values()),
                "logit_bias values must be finite numbers",
            ),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidRequest(message, param)
        for param, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias)):
            bad = next((int(t) for t in ids if not 0 <= int(t) < vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param)


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: float | None = None  # None when the request asked for no logprobs
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


def _generator(seed: int | None) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(secrets.randbits(64) if seed is None else seed % 2**64))


class SequenceSampler:
    """Sampling state of one sequence: its generator and the token counts penalties need."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        eos_ids: Iterable[int] = (),
        seed: int | None = None,
    ) -> None:
        self.params, self.vocab_size = params, vocab_size
        self.rng = _generator(seed)
        self.suppress_early = np.array(sorted({*eos_ids, *params.stop_token_ids}), dtype=np.int64)
        self.counts = np.zeros(vocab_size, dtype=np.float64)  # generated tokens
        self.in_prompt = np.zeros(vocab_size, dtype=bool)
        if params.repetition_penalty != 1.0 and len(prompt_ids):
            self.in_prompt[np.asarray(list(prompt_ids), dtype=np.int64)] = True
        if params.logit_bias:
            self.bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
            self.bias = np.fromiter(params.logit_bias.values(), dtype=np.float64, count=len(params.logit_bias))
        self.generated = 0

    def fork(self, seed: int | None) -> SequenceSampler:
        """A sibling sequence (n > 1): same prompt state, its own generator."""
        other = SequenceSampler(self.params, (), self.vocab_size, seed=seed)
        other.suppress_early, other.in_prompt = self.suppress_early, self.in_prompt
        other.counts, other.generated = self.counts.copy(), self.generated
        return other

    def sample(self, logits) -> SampledToken:
        """logits: [V] float (numpy array, or anything numpy reads: a CPU tensor) -> the next
        token (and its logprobs when asked). Raises SamplingError on NaN / infinite logits."""
        p = self.params
        raw = _finite(logits)
        x = self.process(raw)
        if p.greedy:
            token = int(x.argmax())
            if x[token] == -np.inf:  # everything suppressed: the model's own choice
                token = int(raw.argmax())
        else:
            token = self._draw(x, raw)
        return self._emit(raw, token)

    # -- speculative sampling (self-speculative decoding of sampled requests) -------------
    # Leviathan et al. 2023 / Chen et al. 2023: a draft token d ~ q is kept with probability
    # min(1, p(d) / q(d)); if not, the token is drawn from max(0, p - q) renormalised. The
    # kept or redrawn token is distributed exactly as p, whatever q is -- so q may be the
    # sparse model's distribution under this sampler's state at the round's start (penalties
    # not counting the round's earlier drafts): a worse q only lowers acceptance.

    def distribution(self, logits) -> np.ndarray:
        """The normalised float64 distribution `sample` draws from for these logits (one-hot
        for a greedy request): processing, top-k, temperature, top-p and min-p applied."""
        raw = np.asarray(logits)
        x = self.process(raw)
        if self.params.greedy:
            token = int(x.argmax())
            out = np.zeros(raw.size)
            out[token if x[token] != -np.inf else int(raw.argmax())] = 1.0
            return out
        probs = self._probs(x)
        if probs is None:  # every token suppressed: the model's own choice
            probs = np.zeros(raw.size)
            probs[int(raw.argmax())] = 1.0
        return probs / probs.sum()

    def draft(self, logits) -> tuple[int, np.ndarray]:
        """A draft token drawn from the draft model's logits, and the distribution q it was
        drawn from (needed by `verify_draft`). The sampler's state does not change."""
        q = self.distribution(logits)
        return self._pick(q), q

    def verify_draft(self, logits, draft: int, q: np.ndarray) -> SampledToken:
        """The next token given the target model's logits and a draft d ~ q: d itself with
        probability min(1, p(d) / q(d)), else a draw from max(0, p - q). Accepted like
        `sample` (counts, logprobs of the target's raw logits)."""
        raw = _finite(logits)
        p = self.distribution(raw)
        if self.rng.random() * q[draft] < p[draft]:  # u < p(d) / q(d), without dividing
            return self._emit(raw, draft)
        residual = np.maximum(p - q, 0.0)
        return self._emit(raw, self._pick(residual if residual.sum() > 0 else p))

    def _pick(self, probs: np.ndarray) -> int:
        """One draw from unnormalised probabilities (at least one positive)."""
        cdf = np.cumsum(probs)
        token = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return min(token, int(np.flatnonzero(probs)[-1]))  # rounding at the very top of the cdf

    def _emit(self, raw: np.ndarray, token: int) -> SampledToken:
        """Count the chosen token; its logprobs (of the raw distribution) when asked."""
        p = self.params
        self.accept(token)
        if p.logprobs is None:
            return SampledToken(token)
        lp = _log_softmax(raw)
        alternatives: tuple[tuple[int, float], ...] = ()
        if p.logprobs:
            k = min(p.logprobs, lp.size)
            top = np.argpartition(-lp, k - 1)[:k]
            top = top[np.lexsort((top, -lp[top]))]  # most likely first; ties -> lower id
            alternatives = tuple((int(t), float(lp[t])) for t in top)
        return SampledToken(token, float(lp[token]), alternatives)

    def accept(self, token: int) -> None:
        self.counts[token] += 1
        self.generated += 1

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Bias, min_tokens suppression and penalties. Returns the input itself when nothing
        applies, else a new float64 array (values may reach +-inf, never NaN)."""
        p = self.params
        x = logits
        changed = False

        def writable() -> np.ndarray:
            nonlocal x, changed
            if not changed:
                x, changed = x.astype(np.float64), True
            return x

        if p.logit_bias:
            writable()[self.bias_ids] += self.bias
        if self.generated < p.min_tokens and self.suppress_early.size:
            writable()[self.suppress_early] = -np.inf
        if p.repetition_penalty != 1.0:
            seen = np.flatnonzero(self.in_prompt | (self.counts > 0))
            if seen.size:
                v = writable()[seen]
                with np.errstate(over="ignore", under="ignore"):
                    x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.generated:
            seen = np.flatnonzero(self.counts)
            writable()[seen] -= p.frequency_penalty * self.counts[seen] + p.presence_penalty
        return x

    def _draw(self, x: np.ndarray, raw: np.ndarray) -> int:
        """One draw from the processed scores `x` (the raw argmax if all are suppressed)."""
        probs = self._probs(x)
        return int(raw.argmax()) if probs is None else self._pick(probs)

    def _probs(self, x: np.ndarray) -> np.ndarray | None:
        """top-k -> temperature -> top-p -> min-p: unnormalised probabilities, None when
        every token is suppressed. (top-k is taken before the temperature: the same set in
        exact arithmetic, and an extreme temperature cannot round distinct logits into ties.)"""
        p = self.params
        x = np.asarray(x, dtype=np.float64)
        if p.top_k > 0 and p.top_k < x.size:
            kth = np.partition(x, x.size - p.top_k)[x.size - p.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = _softmax(x, p.temperature)
        if probs is None:
            return None
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        if p.min_p > 0.0:
            probs = np.where(probs < p.min_p * probs.max(), 0.0, probs)
        return probs


def _finite(logits) -> np.ndarray:
    """The logits as a numpy array; SamplingError when any is NaN or infinite (a model fault)."""
    raw = np.asarray(logits)
    if not math.isfinite(float(raw.sum(dtype=np.float64))) and not np.isfinite(raw).all():
        bad = int(np.count_nonzero(~np.isfinite(raw)))
        raise SamplingError(f"the model produced {bad} non-finite logits (NaN or infinite) for this sequence")
    return raw


def _softmax(x: np.ndarray, temperature: float) -> np.ndarray | None:
    """Unnormalised probabilities (the best is 1) of softmax(x / T) for float64 scores that
    may hold +-inf; None when every score is -inf. The scores are shifted by their maximum
    before the division, so a tiny T overflows only towards -inf (the limit: all mass on the
    best tokens); +inf scores (an overflowed penalty) share the mass."""
    m = x.max()
    if m == np.inf:
        return (x == np.inf).astype(np.float64)
    if m == -np.inf:
        return None
    with np.errstate(over="ignore", under="ignore"):
        return np.exp((x - m) / temperature)


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most likely tokens until their mass reaches top_p (the best always stays).

    Sorting the whole vocabulary costs milliseconds; the kept set nearly always lies within
    the few hundred best tokens, so sort the best m (m growing) until their mass exceeds
    top_p, at which point nothing after them can be kept."""
    total = probs.sum()
    m = 64
    while True:
        m = min(m, probs.size)
        best = np.argpartition(-probs, m - 1)[:m] if m < probs.size else np.arange(probs.size)
        best = best[np.lexsort((best, -probs[best]))]
        mass = np.cumsum(probs[best]) / total
        if m == probs.size or mass[-1] > top_p:
            keep = best[(mass - probs[best] / total) <= top_p]  # mass before the token <= top_p
            out = np.zeros_like(probs)
            out[keep] = probs[keep]
            return out
        m *= 8


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))
