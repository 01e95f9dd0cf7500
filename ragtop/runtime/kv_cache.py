"""KV-cache accounting: slots, a per-slot context limit, bytes, admission.

The runner owns the buffers: one preallocated [slots, Hkv, capacity, Dh] key and value
tensor per layer (plus block summaries for block selection). This module decides how many
slots fit in a memory budget, hands slots out (lowest free first, so the running batch stays
in a compact range of slots and a step binds a contiguous view of the cache), and reports
bytes and usage. A slot reserves a whole context, so a request admitted never runs out of
cache later: there is no preemption to do.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .errors import EngineError, PromptTooLong

MIN_CONTEXT = 16  # below this a shrunken context is useless: refuse to start instead


@dataclass(frozen=True)
class CachePlan:
    """How the cache is laid out: `slots` sequences of up to `context_limit` tokens each."""

    slots: int
    context_limit: int
    bytes_per_token: int
    shrunk_from: int | None = None  # the context asked for, when memory forced a smaller one

    @property
    def total_bytes(self) -> int:
        return self.slots * self.context_limit * self.bytes_per_token


def plan_cache(bytes_per_token: int, max_model_len: int, max_slots: int,
               context_limit: int | None = None, memory_bytes: int | None = None) -> CachePlan:
    """Fit `max_slots` sequences of `context_limit` tokens (default the model's) in the budget.

    With too little memory for even one full context, start with a smaller context rather
    than refuse to start (users' most common complaint); refuse only below MIN_CONTEXT.
    """
    if max_slots < 1:
        raise EngineError(f"need at least one cache slot, got {max_slots}")
    wanted = min(context_limit or max_model_len, max_model_len)
    if context_limit is not None and context_limit < 2:
        raise EngineError(f"context limit must be >= 2 tokens, got {context_limit}")
    if memory_bytes is None:
        return CachePlan(max_slots, wanted, bytes_per_token)
    per_slot = wanted * bytes_per_token
    slots = min(max_slots, memory_bytes // per_slot)
    if slots >= 1:
        return CachePlan(int(slots), wanted, bytes_per_token)
    limit = memory_bytes // bytes_per_token
    if limit < MIN_CONTEXT:
        raise EngineError(
            f"KV-cache memory budget of {memory_bytes} bytes holds {limit} tokens "
            f"({bytes_per_token} bytes each); at least {MIN_CONTEXT} are needed"
        )
    return CachePlan(1, int(limit), bytes_per_token, shrunk_from=wanted)


@dataclass(frozen=True)
class CacheUsage:
    slots: int
    slots_used: int
    tokens: int  # tokens cached over all slots
    token_capacity: int
    bytes_used: int  # bytes holding cached tokens
    bytes_total: int  # bytes preallocated

    @property
    def used_perc(self) -> float:
        """Fraction of the cache's tokens holding data (0..1)."""
        return self.tokens / self.token_capacity if self.token_capacity else 0.0

    @property
    def reserved_perc(self) -> float:
        """Fraction of slots given to sequences (0..1): what admission is limited by."""
        return self.slots_used / self.slots if self.slots else 0.0


class KVCacheManager:
    def __init__(self, plan: CachePlan) -> None:
        self.plan = plan
        self._free = list(range(plan.slots))
        heapq.heapify(self._free)
        self.lengths = [0] * plan.slots  # tokens cached per slot (kept by the scheduler)

    @property
    def context_limit(self) -> int:
        return self.plan.context_limit

    @property
    def num_free(self) -> int:
        return len(self._free)

    def check_prompt(self, prompt_tokens: int) -> None:
        """Refuse a prompt that leaves no room for a generated token, with the numbers."""
        if prompt_tokens >= self.plan.context_limit:
            raise PromptTooLong(prompt_tokens, self.plan.context_limit)

    def can_allocate(self, n: int) -> bool:
        return len(self._free) >= n

    def allocate(self, n: int = 1) -> list[int]:
        if len(self._free) < n:
            raise EngineError(f"asked for {n} cache slots, {len(self._free)} free")
        slots = [heapq.heappop(self._free) for _ in range(n)]
        for s in slots:
            self.lengths[s] = 0
        return slots

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def usage(self) -> CacheUsage:
        tokens = sum(self.lengths)
        p = self.plan
        return CacheUsage(p.slots, p.slots - len(self._free), tokens, p.slots * p.context_limit,
                          tokens * p.bytes_per_token, p.total_bytes)
