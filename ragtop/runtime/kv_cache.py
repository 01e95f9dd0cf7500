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
    blocks_total: int = 0  # pages of a paged cache (0: contiguous slots)
    blocks_used: int = 0  # pages referenced by a block table (running or cached prefix)

    @property
    def used_perc(self) -> float:
        """Fraction of the cache's tokens holding data (0..1)."""
        return self.tokens / self.token_capacity if self.token_capacity else 0.0

    @property
    def reserved_perc(self) -> float:
        """Fraction of slots given to sequences (0..1), of pages in use with a paged cache:
        what admission is limited by."""
        if self.blocks_total:
            return self.blocks_used / self.blocks_total
        return self.slots_used / self.slots if self.slots else 0.0


@dataclass(frozen=True)
class PrefixHit:
    """A prompt's first `tokens` tokens are cached in `slot`."""

    tokens: int
    slot: int
    copy: bool  # copy the prefix into another slot (`slot` is running, or holds more worth keeping)


class KVCacheManager:
    paged = False

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

    # a slot reserves a whole context: admission by slots only, nothing to grow (PagedKVCacheManager)
    def can_admit(self, tokens: int, cached: int = 0, n: int = 1) -> bool:
        return True

    def ensure(self, slot: int, tokens: int) -> bool:
        return True

    def preempt(self, slot: int, tokens: Sequence[int], dense: bool = False) -> None:
        raise EngineError("a whole-context slot never needs preempting")

    def unpin(self, pages: list[int]) -> None:
        pass

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


# -- paged KV cache ---------------------------------------------------------------------------
WATERMARK = 0.01  # fraction of pages admission keeps free for running sequences to grow (vLLM's)


@dataclass(frozen=True)
class PagePlan:
    """A paged cache: `num_pages` pages of `page_size` tokens shared by every sequence,
    `slots` block tables (running sequences plus freed ones whose pages stay cached), each
    sequence up to `context_limit` tokens."""

    num_pages: int
    page_size: int
    slots: int
    context_limit: int
    bytes_per_token: int
    shrunk_from: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.page_size * self.bytes_per_token

    @property
    def watermark(self) -> int:
        return max(1, int(self.num_pages * WATERMARK))


def plan_pages(
    bytes_per_token: int,
    max_model_len: int,
    page_size: int,
    max_batch_size: int,
    context_limit: int | None = None,
    memory_bytes: int | None = None,
) -> PagePlan:
    """Pages for the budget (default: as much memory as `max_batch_size` whole contexts, the
    contiguous layout's default). One sequence may grow to the whole pool less the watermark,
    so the context limit shrinks to that when the budget is small."""
    if context_limit is not None and context_limit < 2:
        raise EngineError(f"context limit must be >= 2 tokens, got {context_limit}")
    wanted = min(context_limit or max_model_len, max_model_len)
    page_bytes = page_size * bytes_per_token
    pages = (memory_bytes // page_bytes) if memory_bytes is not None else max_batch_size * -(-wanted // page_size)
    pages = int(pages)
    watermark = max(1, int(pages * WATERMARK))
    limit = min(wanted, (pages - watermark) * page_size)
    if limit < MIN_CONTEXT:
        raise EngineError(
            f"KV-cache memory budget of {memory_bytes} bytes holds {pages} pages of {page_size} tokens "
            f"({bytes_per_token} bytes each); at least {MIN_CONTEXT} tokens are needed"
        )
    slots = 2 * max_batch_size + 16  # running sequences + freed ones still holding cached prefixes
    return PagePlan(pages, page_size, slots, limit, bytes_per_token, wanted if limit < wanted else None)


class BlockAllocator:
    """Pages of a paged cache (vLLM's BlockAllocator): a free list and a reference count per
    page. A page referenced by several block tables (a shared prompt prefix) is freed when its
    last reference goes."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.refs = np.zeros(num_pages, dtype=np.int64)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise EngineError("no free KV-cache page")
        page = self._free.pop()
        self.refs[page] = 1
        return page

    def incref(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self.refs[p] < 1:
                raise EngineError(f"page {p} is not allocated")
            self.refs[p] += 1

    def decref(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self.refs[p] < 1:
                raise EngineError(f"page {p} freed twice")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free.append(p)


class PagedKVCacheManager(KVCacheManager):
    """Cache memory that follows use (vLLM's PagedAttention block manager): a slot is a block
    table, not memory. A sequence gets pages as it grows (`ensure`); admission asks for the
    prompt's pages (beyond a cached prefix) plus a watermark, not a whole context; when a
    running sequence needs a page and none is free, the scheduler preempts (recompute).

    Prefix caching shares pages by reference count, at whole-page granularity (prefix_block =
    page size): a hit points the new table at the cached pages, nothing is copied, and no
    sequence ever writes into a shared page (a match stops at a page boundary at or before
    the source's computed length, and the source writes only after it). A freed slot keeps its
    full pages (and their tokens) as a cached prefix until the pool runs short: then freed
    slots are evicted, least recently freed first, before anyone is preempted."""

    paged = True

    def __init__(self, plan: PagePlan, prefix_caching: bool = True) -> None:
        super().__init__(
            CachePlan(plan.slots, plan.context_limit, plan.bytes_per_token, plan.shrunk_from),
            prefix_caching,
            plan.page_size,
        )
        self.pages = plan
        self.page_size = plan.page_size
        self.allocator = BlockAllocator(plan.num_pages)
        self.tables: list[list[int]] = [[] for _ in range(plan.slots)]
        self._held_refs = np.zeros(plan.num_pages, dtype=np.int64)  # references from freed slots

    # -- pages ------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def reclaimable(self) -> int:
        """Free pages plus those only freed slots' cached prefixes hold."""
        a = self.allocator
        return a.num_free + int(((a.refs > 0) & (a.refs == self._held_refs)).sum())

    def can_admit(self, tokens: int, cached: int = 0, n: int = 1) -> bool:
        """Room for a prompt of `tokens` tokens whose first `cached` are shared, plus a page for
        each extra sibling (n > 1), keeping the watermark free for running sequences."""
        need = self.pages_for(tokens) - cached // self.page_size + (n - 1)
        return self.reclaimable() - need >= self.pages.watermark

    def can_hold(self, tokens: int, n: int = 1) -> bool:
        """The request fits an empty pool (else it would wait forever at the queue's head)."""
        return self.pages_for(tokens) + (n - 1) <= self.pages.num_pages - self.pages.watermark

    def ensure(self, slot: int, tokens: int) -> bool:
        """Give the slot pages for positions < `tokens`; False (nothing allocated) if the pool
        cannot, even after evicting every cached prefix of freed slots."""
        table = self.tables[slot]
        need = self.pages_for(tokens) - len(table)
        if need <= 0:
            return True
        while self.allocator.num_free < need and self._evict_one():
            pass
        if self.allocator.num_free < need:
            return False
        table.extend(self.allocator.allocate() for _ in range(need))
        return True

    def _evict_one(self) -> bool:
        """Drop the least recently freed slot's cached prefix; False when none is left."""
        held = [s for s in self._free if self.tables[s]]
        if not held:
            return False
        self._release(min(held, key=lambda s: self._freed_at[s]))
        return True

    def _release(self, slot: int) -> None:
        """A free slot gives up its cached pages."""
        pages, self.tables[slot] = self.tables[slot], []
        self._held_refs[pages] -= 1
        self.allocator.decref(pages)
        self.held[slot] = None

    def pin(self, slot: int, tokens: int) -> list[int]:
        """One more reference to the pages holding `slot`'s first `tokens` (whole pages): a
        prefix hit, taken before allocating the new slot (which may evict the source)."""
        pages = self.tables[slot][: tokens // self.page_size]
        self.allocator.incref(pages)
        return pages

    def unpin(self, pages: list[int]) -> None:
        self.allocator.decref(pages)

    def attach(self, slot: int, pages: list[int]) -> None:
        """A freshly allocated slot starts with these (pinned) pages."""
        self.tables[slot] = list(pages)

    def fork(self, src: int, dst: int, tokens: int) -> list[tuple[int, int]] | None:
        """dst (a fresh slot) takes src's first `tokens` positions: full pages shared, the last
        partial page copied (copy-on-write at fork). Returns the (src page, dst page) copies to
        make, or None when no page is free for them."""
        full = tokens // self.page_size
        copies = []
        if tokens % self.page_size:
            if self.allocator.num_free < 1 and not self._evict_one():
                return None
            if self.allocator.num_free < 1:
                return None
            copies.append((self.tables[src][full], self.allocator.allocate()))
        shared = self.tables[src][:full]
        self.allocator.incref(shared)
        self.tables[dst] = shared + [d for _, d in copies]
        return copies

    # -- slots ------------------------------------------------------------------------
    def check_prompt(self, prompt_tokens: int) -> None:
        super().check_prompt(prompt_tokens)

    def allocate(self, n: int = 1, prefer: int | None = None, avoid: int | None = None) -> list[int]:
        slots = super().allocate(n, prefer, avoid)
        for s in slots:  # a reused slot's cached prefix goes
            if self.tables[s]:
                pages, self.tables[s] = self.tables[s], []
                self._held_refs[pages] -= 1
                self.allocator.decref(pages)
        return slots

    def free(self, slot: int, tokens: Sequence[int] = (), dense: bool = False) -> None:
        """Give the slot back; its full pages stay as a cached prefix of `tokens` (matchable
        until evicted), the rest return to the pool."""
        keep = min(len(tokens) // self.page_size, len(self.tables[slot])) if self.prefix_caching else 0
        table = self.tables[slot]
        self.allocator.decref(table[keep:])
        self.tables[slot] = table[:keep]
        self._held_refs[table[:keep]] += 1
        super().free(slot, tokens[: keep * self.page_size], dense)
        if not keep:
            self.held[slot] = None

    def preempt(self, slot: int, tokens: Sequence[int], dense: bool = False) -> None:
        """A preempted sequence's slot: freed like a finished one (its full pages stay cached,
        so a re-admission may find them if nothing evicts them first)."""
        self.free(slot, tokens, dense)

    def usage(self) -> CacheUsage:
        tokens = sum(self.lengths)
        used = self.pages.num_pages - self.allocator.num_free
        p = self.pages
        return CacheUsage(
            p.slots,
            p.slots - len(self._free),
            tokens,
            p.num_pages * p.page_size,
            used * p.page_size * p.bytes_per_token,
            p.total_bytes,
            blocks_total=p.num_pages,
            blocks_used=used,
        )
