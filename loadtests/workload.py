"""What a run sends: request arrival times and prompts.

Arrivals (as vllm bench serve): `rate = inf` sends every request at once (a `max_concurrency`
cap then makes it a closed loop of that many clients); a finite rate draws exponential gaps
(a Poisson process) from a seeded generator, so a seed fixes the schedule.

Prompts are lists of token ids, so their length is exact (the server accepts token-id
prompts): a base English text tokenized by the server (`POST /tokenize`), tiled to the wanted
length, each request starting at a different offset. `fixed` gives every request the same
input and output length; `mix` draws both from log-normal distributions (seeded) around the
given lengths, a realistic spread for load tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BASE_TEXT = (
    "The history of computing is a story of memory as much as of arithmetic. Early machines "
    "stored a few thousand words; programmers counted every cell and arranged their data so "
    "that the next value was close to the last. Decades later the arithmetic units grew so "
    "fast that most programs wait for memory instead: a processor can multiply hundreds of "
    "numbers in the time it takes to fetch one line from main memory. Language models are no "
    "exception. To produce one word, a model reads all of its weights and, for every earlier "
    "word of the conversation, the keys and values it remembered. When the conversation is "
    "long, that memory dominates, and the only way to answer faster is to read less of it. "
    "Sparse attention chooses, for each new word, the few earlier words that matter most, and "
    "skips the rest. Whether that choice is cheap, and whether it loses anything important, "
    "is what careful measurement has to show. "
)


def arrival_times(n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """Send offsets (seconds from the start) of n requests.

    rate = inf: all at 0. Otherwise gaps from a gamma distribution with mean 1/rate and shape
    `burstiness` (1.0 = exponential gaps = a Poisson process; < 1 burstier, > 1 more regular).
    The first request is sent after the first gap, as vLLM does.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if rate == float("inf"):
        return [0.0] * n
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.cumsum(gaps).tolist()


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int


def tile(base: list[int], length: int, offset: int = 0) -> list[int]:
    if not base:
        raise ValueError("cannot build prompts from an empty token list")
    reps = (offset + length) // len(base) + 1
    return (base * reps)[offset : offset + length]


def make_requests(
    base_tokens: list[int],
    n: int,
    input_len: int,
    output_len: int,
    dataset: str = "fixed",
    seed: int = 0,
    sigma: float = 0.6,
    max_input: int | None = None,
    max_output: int | None = None,
) -> list[RequestSpec]:
    """n requests of `input_len` prompt tokens and `output_len` new tokens (fixed), or lengths
    drawn around those (mix: log-normal with median input_len / output_len and shape sigma,
    clipped to [1, max_*])."""
    if input_len < 1 or output_len < 1:
        raise ValueError("input and output lengths must be >= 1")
    rng = np.random.default_rng(seed + 1)
    if dataset == "fixed":
        ins, outs = [input_len] * n, [output_len] * n
    elif dataset == "mix":
        ins = np.clip(np.round(rng.lognormal(np.log(input_len), sigma, n)), 1, max_input or 4 * input_len)
        outs = np.clip(np.round(rng.lognormal(np.log(output_len), sigma, n)), 1, max_output or 4 * output_len)
        ins, outs = [int(x) for x in ins], [int(x) for x in outs]
    else:
        raise ValueError(f"dataset must be 'fixed' or 'mix', got {dataset!r}")
    offsets = rng.integers(0, len(base_tokens), size=n)
    return [RequestSpec(tile(base_tokens, i, int(o)), m) for i, m, o in zip(ins, outs, offsets, strict=True)]
