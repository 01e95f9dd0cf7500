"""KV-cache accounting: slots, a per-slot context limit, bytes, admission.

The runner owns the buffers: one preallocated [slots, Hkv, capacity, Dh] key and value
tensor per layer (plus block summaries for block selection). This module decides how many
slots fit in a memory budget, hands slots out, and reports bytes and usage. A slot reserves
a whole context, so a request admitted never runs out of cache later: there is no
preemption to do.

Automatic prefix caching (as llama.cpp's server reuses a slot's prompt cache, at vLLM's
block granularity): a freed slot keeps the tokens whose keys and values it still holds.
A new prompt that begins with tokens held by a free slot takes that slot and prefills only
the rest — or, when that would throw away more than a block of what the slot holds (a short
question about a long document) and another slot is free, gets the prefix copied into that
other slot; one that begins with the computed tokens of a running sequence gets that prefix
copied into its own slot (a memory copy, far cheaper than recomputing it). Matches count in
whole blocks of `prefix_block` tokens (the block-selection block size, when larger), so a
reused block summary never mixes old and new keys, and leave at least one prompt token to
compute (its logits give the first output token). Slots are handed out: the matched one;
else the lowest-numbered slot that holds nothing (a compact batch binds a contiguous view of
the cache); else the free slot used least recently (LRU eviction of cached prefixes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import EngineError, PromptTooLong

PREFIX_BLOCK = 16  # tokens: the granularity of prefix matches

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


def plan_cache(
    bytes_per_token: int,
    max_model_len: int,
    max_slots: int,
    context_limit: int | None = None,
    memory_bytes: int | None = None,
) -> CachePlan:
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


@dataclass(frozen=True)
class PrefixHit:
    """A prompt's first `tokens` tokens are cached in `slot`."""

    tokens: int
    slot: int
    copy: bool  # copy the prefix into another slot (`slot` is running, or holds more worth keeping)


class KVCacheManager:
    def __init__(self, plan: CachePlan, prefix_caching: bool = True, prefix_block: int = PREFIX_BLOCK) -> None:
        self.plan = plan
        self.prefix_caching, self.prefix_block = prefix_caching, max(1, prefix_block)
        self._free: set[int] = set(range(plan.slots))
        self.lengths = [0] * plan.slots  # tokens cached per slot (kept by the scheduler)
        self.held: list[np.ndarray | None] = [None] * plan.slots  # a free slot's still-valid tokens
        self.held_dense = [False] * plan.slots  # ... written with dense attention (speculation)
        self._freed_at = [0] * plan.slots  # LRU clock of free slots
        self._clock = 0

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

    def match(
        self, prompt: Sequence[int], running: Iterable[tuple[int, Sequence[int]]] = (), n: int = 1, dense: bool = False
    ) -> PrefixHit | None:
        """The longest cached prefix of `prompt`, in whole blocks, leaving >= 1 token to compute:
        among free slots' held tokens, and `running` (slot, computed tokens) pairs. `n`: the
        slots the request needs (a copy from a free slot needs one more). `dense`: only
        caches written with dense attention (speculating requests), else only the others."""
        if not self.prefix_caching:
            return None
        limit = (len(prompt) - 1) // self.prefix_block * self.prefix_block
        if limit < self.prefix_block:
            return None
        want = np.asarray(prompt[:limit], dtype=np.int64)
        best: PrefixHit | None = None
        candidates = [
            (s, self.held[s], False) for s in self._free if self.held[s] is not None and self.held_dense[s] == dense
        ]
        candidates += [(s, tokens, True) for s, tokens in running]
        for slot, tokens, copy in candidates:
            m = min(limit, len(tokens))
            if m < self.prefix_block or (best is not None and m <= best.tokens):
                continue
            have = np.asarray(tokens[:m], dtype=np.int64)
            diff = np.flatnonzero(want[:m] != have)
            common = (int(diff[0]) if diff.size else m) // self.prefix_block * self.prefix_block
            if common >= self.prefix_block and (
                best is None or common > best.tokens or (common == best.tokens and not copy)
            ):
                best = PrefixHit(common, slot, copy)
        if best is not None and not best.copy and len(self._free) > n:
            held = self.held[best.slot]
            if held is not None and len(held) - best.tokens >= self.prefix_block:
                best = PrefixHit(best.tokens, best.slot, True)  # keep the longer cache, copy its prefix
        return best

    def allocate(self, n: int = 1, prefer: int | None = None, avoid: int | None = None) -> list[int]:
        """n free slots: `prefer` first when it is free (a prefix hit), then empty slots
        lowest first, then the least recently freed; `avoid` (a copy's source) last."""
        if len(self._free) < n:
            raise EngineError(f"asked for {n} cache slots, {len(self._free)} free")
        order = sorted(
            self._free, key=lambda s: (s != prefer, s == avoid, self.held[s] is not None, self._freed_at[s], s)
        )
        slots = order[:n]
        for s in slots:
            self._free.discard(s)
            self.lengths[s], self.held[s] = 0, None
        return slots

    def free(self, slot: int, tokens: Sequence[int] = (), dense: bool = False) -> None:
        """Give the slot back; `tokens` (whose keys and values it holds, from position 0) stay
        matchable until the slot is reused. The last position is never kept: a decode step may
        write one garbage position at a full slot's end (see runners/base.py group_chunks)."""
        self.lengths[slot] = 0
        keep = min(len(tokens), self.plan.context_limit - 1)
        self.held[slot] = np.asarray(tokens[:keep], dtype=np.int64) if self.prefix_caching and keep else None
        self.held_dense[slot] = dense
        self._clock += 1
        self._freed_at[slot] = self._clock
        self._free.add(slot)

    def usage(self) -> CacheUsage:
        tokens = sum(self.lengths)
        p = self.plan
        return CacheUsage(
            p.slots,
            p.slots - len(self._free),
            tokens,
            p.slots * p.context_limit,
            tokens * p.bytes_per_token,
            p.total_bytes,
        )
