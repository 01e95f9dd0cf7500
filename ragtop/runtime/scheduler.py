"""Iteration-level scheduling (plain Python; no tensors, testable with a fake runner).

Every step the scheduler builds one batch under two limits, `max_batch_size` sequences and
`max_tokens_per_step` tokens:

1. every running sequence that is decoding gets its one token (decodes keep flowing);
2. prompts being prefilled continue with a chunk of at most `prefill_chunk` tokens;
3. waiting requests are admitted in arrival order (FIFO: when the head of the queue does
   not fit, nobody behind it jumps ahead) while slots, sequences and tokens remain, and
   start their prefill in the same step.

A request with n > 1 reserves n slots at admission; only its first sequence prefills the
prompt; when that ends, the engine copies the prompt's cache into the siblings' slots
(`fork`) and all n decode independently. A finished or aborted sequence frees its slot at
once; the waiting queue is bounded (`QueueFull` when more than `max_waiting` requests would
still wait after the next admission).

Paged cache (kv_cache.PagedKVCacheManager): admission asks for the prompt's pages (beyond a
cached prefix) plus a watermark instead of a whole context; every scheduled chunk first gets
the pages it writes (`ensure`). When the pool is out of pages, the most recently admitted
running request is preempted by recompute (vLLM's default): its pages are freed (its full
pages stay cached as a prefix until evicted), it goes back to the head of the queue with the
tokens it has, and on re-admission it prefills prompt + generated tokens and samples the next
token: nothing already emitted is emitted again. `SchedulerOutput.preempted` lists them.

Prefix caching (kv_cache.py): at admission the prompt's longest cached prefix is looked up
among free slots and running sequences; the request starts with those tokens computed
(`SequenceGroup.cached_tokens`), and a prefix held by a running sequence is listed in
`SchedulerOutput.copies` for the engine to copy before the step's model calls.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import EngineError, InvalidRequest, QueueFull
from .kv_cache import KVCacheManager

Status = Literal["waiting", "prefill", "fork", "decode", "finished"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 16  # sequences running at once (and per step)
    max_tokens_per_step: int = 512  # tokens computed per step, prefill and decode together
    prefill_chunk: int = 256  # prompt tokens of one sequence per step
    max_waiting: int = 256  # requests queued before QueueFull

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_per_step", "prefill_chunk", "max_waiting"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_step < self.max_batch_size:
            raise EngineError(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_batch_size "
                f"({self.max_batch_size}) so that every running sequence decodes each step"
            )


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    group: SequenceGroup
    index: int  # 0..n-1 within its request
    tokens: list[int]  # prompt, then generated tokens
    status: Status = "waiting"
    slot: int = -1
    computed: int = 0  # tokens written to the cache
    finish_reason: str | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))

    @property
    def prompt_len(self) -> int:
        return len(self.group.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.status == "finished"


@dataclass(eq=False)
class SequenceGroup:
    """One request: a prompt and its n sequences."""

    request_id: str
    prompt: list[int]
    n: int = 1
    data: Any = None  # the engine's per-request state
    seqs: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    lookahead: int = 0  # positions past the next token a decode step may write (speculative drafts)
    preemptions: int = 0  # times this request was preempted (paged cache out of pages)
    # the cache holds dense-attention keys/values (a speculating request, engine.py): shared
    # only with such requests, as sparse attention writes other values from layer 2 on
    dense_kv: bool = False

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(self, i, list(self.prompt)) for i in range(self.n)]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int
    tokens: list[int]

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token: its logits give the next token."""
        return self.start + len(self.tokens) == len(self.seq.tokens)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    admitted: list[SequenceGroup]
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, tokens) first
    preempted: list[SequenceGroup] = field(default_factory=list)  # back to the queue's head (recompute)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCacheManager) -> None:
        self.config, self.cache = config, cache
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []

    # -- requests ---------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        """Queue a request; raises PromptTooLong or QueueFull (nothing queued then)."""
        self.cache.check_prompt(len(group.prompt))
        if group.n > min(self.config.max_batch_size, self.cache.plan.slots):
            raise InvalidRequest(
                f"n={group.n} exceeds the {min(self.config.max_batch_size, self.cache.plan.slots)} sequences the "
                "engine runs at once"
            )
        if self.cache.paged and not self.cache.can_hold(len(group.prompt), group.n):
            raise InvalidRequest(
                f"a prompt of {len(group.prompt)} tokens with n={group.n} does not fit the KV cache's "
                f"{self.cache.pages.num_pages} pages of {self.cache.page_size} tokens"
            )
        if self._waiting_after_admission(group) > self.config.max_waiting:
            raise QueueFull(len(self.waiting))
        self.waiting.append(group)

    def _waiting_after_admission(self, group: SequenceGroup) -> int:
        """Requests that would still wait, with `group` queued, once the next step admits what
        fits (FIFO, by free batch rows and slots). So a burst that arrives before the engine
        thread schedules is bounded by max_batch_size + max_waiting, not by max_waiting alone
        (Ray Serve's max_ongoing_requests assumes the same capacity)."""
        room = min(self.config.max_batch_size - self.num_running, self.cache.num_free)
        if self.cache.paged:  # a rough bound: admission by pages is decided at schedule time
            room = self.config.max_batch_size - self.num_running
        queue = [*self.waiting, group]
        starting = 0
        for g in queue:
            if g.n > room:
                break
            room -= g.n
            starting += 1
        return len(queue) - starting

    def abort(self, request_id: str, reason: str = "abort") -> SequenceGroup | None:
        """Drop a request wherever it is, freeing its slots now; its unfinished sequences end
        with `reason` ("abort", or "error" when generating it failed)."""
        for g in self.waiting:
            if g.request_id == request_id:
                self.waiting.remove(g)
                for s in g.seqs:
                    s.status, s.finish_reason = "finished", reason
                return g
        for g in self.running:
            if g.request_id == request_id:
                for s in g.seqs:
                    if not s.finished:
                        self.finish(s, reason)
                return g
        return None

    @property
    def num_running(self) -> int:
        return sum(1 for g in self.running for s in g.seqs if not s.finished)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget, chunks, admitted, copies = cfg.max_tokens_per_step, [], [], []
        self._preempted: list[SequenceGroup] = []

        for s in list(self._running_seqs("decode")):
            if s.status != "decode" or not self._reserve(s, s.computed + 1 + s.group.lookahead):
                continue  # preempted (itself, or its group by a sibling's need)
            chunks.append(ScheduledChunk(s, s.computed, s.tokens[s.computed :]))
            budget -= len(chunks[-1].tokens)
        for s in list(self._running_seqs("prefill")):
            if budget < 1 or len(chunks) >= cfg.max_batch_size:
                break
            if s.status != "prefill":
                continue
            chunk = self._prefill_chunk(s, budget)
            if not self._reserve(s, chunk.start + len(chunk.tokens)):
                continue
            chunks.append(chunk)
            budget -= len(chunks[-1].tokens)
        while self.waiting and budget >= 1 and len(chunks) < cfg.max_batch_size:
            g = self.waiting[0]
            if g in self._preempted:
                break  # preempted in this very step: it waits for the next one
            live = [s for s in g.seqs if not s.finished]
            if self.num_running + len(live) > cfg.max_batch_size or not self.cache.can_allocate(len(live)):
                break  # FIFO: the head waits for room, nobody overtakes it
            resumed = g.preemptions > 0
            hit = None
            if not resumed or g.n == 1:  # a resumed request may find its own pages still cached
                hit = self.cache.match(live[0].tokens, self._computed_prefixes(g.dense_kv), len(live), g.dense_kv)
            # paged: the hit's pages are pinned first, so that they no longer count as reclaimable
            pinned = self.cache.pin(hit.slot, hit.tokens) if self.cache.paged and hit else []
            if not self.cache.can_admit(len(live[0].tokens), hit.tokens if hit else 0, len(live)):
                self.cache.unpin(pinned)
                break  # not enough free pages (paged cache): wait for running requests to finish
            self.waiting.popleft()
            first = live[0]
            if self.cache.paged:
                slots = self.cache.allocate(len(live), avoid=None if hit is None else hit.slot)
                self.cache.attach(slots[0], pinned)
            else:
                slots = self.cache.allocate(
                    g.n,
                    prefer=None if hit is None or hit.copy else hit.slot,
                    avoid=None if hit is None or not hit.copy else hit.slot,
                )
            for s, slot in zip(live, slots, strict=True):
                s.slot, s.computed = slot, 0
                # a resumed sequence recomputes its own tokens; a new request's siblings wait for the prompt
                s.status = "prefill" if resumed or s is first else "fork"
            if hit is not None:
                first.computed = hit.tokens
                if not resumed:
                    g.cached_tokens = hit.tokens
                self.cache.lengths[first.slot] = hit.tokens
                if hit.copy and not self.cache.paged:
                    copies.append((hit.slot, first.slot, hit.tokens))
            self.running.append(g)
            if not resumed:
                admitted.append(g)
            for s in live if resumed else [first]:
                if budget < 1 or len(chunks) >= cfg.max_batch_size:
                    break
                chunk = self._prefill_chunk(s, budget)
                if not self._reserve(s, chunk.start + len(chunk.tokens)):
                    break
                chunks.append(chunk)
                budget -= len(chunks[-1].tokens)
        preempted = self._preempted
        if preempted:  # a group preempted after one of its chunks was planned: drop those chunks
            chunks = [c for c in chunks if c.seq.group not in preempted]
            admitted = [g for g in admitted if g not in preempted]
        return SchedulerOutput(chunks, admitted, copies, preempted)

    def _reserve(self, s: Sequence, tokens: int) -> bool:
        """Pages for the sequence's positions < `tokens` (paged cache), preempting the most
        recently admitted running requests while the pool is short. False when `s` itself
        was preempted."""
        while not self.cache.ensure(s.slot, min(tokens, self.cache.context_limit)):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is s.group:
                return False
        return True

    def preempt(self, group: SequenceGroup) -> None:
        """Recompute preemption: free the group's slots and pages, requeue it at the head with
        the tokens it has; its unfinished sequences prefill them again on re-admission."""
        for s in group.seqs:
            if s.finished:
                continue
            if s.slot >= 0:
                self.cache.preempt(s.slot, s.tokens[: s.computed] if s.status != "fork" else (), group.dense_kv)
            s.slot, s.computed, s.status = -1, 0, "waiting"
        group.preemptions += 1
        self.running.remove(group)
        self.waiting.appendleft(group)
        self._preempted.append(group)

    def _computed_prefixes(self, dense_kv: bool) -> Iterator[tuple[int, list[int]]]:
        """(slot, tokens whose KV is written) of every running sequence whose cache is of the
        kind asked (dense or sparse keys/values). Speculative drafts never count: they sit
        past `computed`."""
        return (
            (s.slot, s.tokens[: s.computed])
            for g in self.running
            for s in g.seqs
            if not s.finished and s.computed > 0 and g.dense_kv == dense_kv
        )

    def _running_seqs(self, status: Status) -> Iterator[Sequence]:
        return (s for g in self.running for s in g.seqs if s.status == status)

    def _prefill_chunk(self, s: Sequence, budget: int) -> ScheduledChunk:
        n = min(len(s.tokens) - s.computed, self.config.prefill_chunk, budget)
        return ScheduledChunk(s, s.computed, s.tokens[s.computed : s.computed + n])

    # -- after the model ran ----------------------------------------------------------
    def advance(self, chunk: ScheduledChunk) -> None:
        """The chunk's tokens are in the cache."""
        s = chunk.seq
        s.computed = chunk.start + len(chunk.tokens)
        self.cache.lengths[s.slot] = s.computed
        if s.status == "prefill" and s.computed == len(s.tokens):
            s.status = "decode"

    def fork(self, group: SequenceGroup) -> list[Sequence]:
        """Siblings waiting for the prompt's cache: mark them decoding at the parent's length
        (the caller copies the cache). Returns them."""
        parent = group.seqs[0]
        children = [s for s in group.seqs if s.status == "fork"]
        for s in children:
            s.computed, s.status = parent.computed, "decode"
            self.cache.lengths[s.slot] = s.computed
        return children

    def append_token(self, s: Sequence, token: int) -> None:
        s.tokens.append(token)

    def finish(self, s: Sequence, reason: str) -> None:
        """A sequence is done: its slot is free for the next admission."""
        if s.finished:
            return
        s.status, s.finish_reason = "finished", reason
        if s.slot >= 0:  # a failed request's cache may be half-written: not kept for reuse
            self.cache.free(s.slot, () if reason == "error" else s.tokens[: s.computed], s.group.dense_kv)
        if s.group.finished and s.group in self.running:
            self.running.remove(s.group)
