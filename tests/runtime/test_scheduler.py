"""The scheduler alone (no model): admission, chunked prefill, limits, abort, queue, FIFO."""

from __future__ import annotations

import pytest

from ragtop.runtime import EngineError, PromptTooLong, QueueFull, SchedulerConfig
from ragtop.runtime.kv_cache import CachePlan, KVCacheManager, plan_cache
from ragtop.runtime.scheduler import Scheduler, SchedulerOutput, SequenceGroup


def make(slots=4, context=64, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(CachePlan(slots, context, bytes_per_token=10)))


def run_model(s: Scheduler, out: SchedulerOutput, next_token: int = 7) -> None:
    """What the engine does after the model ran: advance, sample one token where due."""
    for c in out.chunks:
        s.advance(c)
        if c.samples:
            for seq in [
                c.seq,
                *(s.fork(c.seq.group) if c.seq.index == 0 and len(c.seq.tokens) == c.seq.prompt_len else []),
            ]:
                s.append_token(seq, next_token)


def group(rid: str, n_prompt: int, n: int = 1) -> SequenceGroup:
    return SequenceGroup(rid, list(range(1, n_prompt + 1)), n)


def test_new_requests_join_the_running_batch_and_finished_ones_leave():
    s = make(slots=4, max_batch_size=4, max_tokens_per_step=64)
    s.add(group("a", 5))
    out = s.schedule()
    assert [(c.seq.group.request_id, len(c.tokens)) for c in out.chunks] == [("a", 5)]
    run_model(s, out)
    s.add(group("b", 3))
    out = s.schedule()  # a decodes while b prefills, in one step
    assert [(c.seq.group.request_id, len(c.tokens), c.samples) for c in out.chunks] == [("a", 1, True), ("b", 3, True)]
    run_model(s, out)
    a = s.running[0].seqs[0]
    s.finish(a, "stop")
    assert s.cache.num_free == 3 and [g.request_id for g in s.running] == ["b"]
    out = s.schedule()
    assert [c.seq.group.request_id for c in out.chunks] == ["b"]


def test_chunked_prefill_keeps_decodes_flowing_within_the_token_budget():
    s = make(slots=4, max_batch_size=4, max_tokens_per_step=8, prefill_chunk=6)
    s.add(group("short", 2))
    run_model(s, s.schedule())
    s.add(group("long", 20))
    sizes = []
    while s.running[-1].seqs[0].status == "prefill" or not sizes:
        out = s.schedule()
        assert out.num_tokens <= 8
        assert out.chunks[0].seq.group.request_id == "short" and len(out.chunks[0].tokens) == 1  # decode every step
        long_chunk = out.chunks[1]
        sizes.append(len(long_chunk.tokens))
        assert long_chunk.samples == (long_chunk.start + len(long_chunk.tokens) == 20)
        run_model(s, out)
    assert sizes == [6, 6, 6, 2] and sum(sizes) == 20


def test_batch_size_and_slots_limit_admission_fifo():
    s = make(slots=2, max_batch_size=2, max_tokens_per_step=64)
    for rid in "abc":
        s.add(group(rid, 3))
    out = s.schedule()
    assert [g.request_id for g in out.admitted] == ["a", "b"] and [g.request_id for g in s.waiting] == ["c"]
    run_model(s, out)
    s.add(group("d", 1))
    assert s.schedule().admitted == []  # no slot: c and d wait
    s.finish(s.running[0].seqs[0], "stop")
    out = s.schedule()
    assert [g.request_id for g in out.admitted] == ["c"]  # FIFO: c before d


def test_fifo_head_of_line_is_not_overtaken():
    s = make(slots=3, max_batch_size=3, max_tokens_per_step=64)
    s.add(group("a", 3))
    run_model(s, s.schedule())
    s.add(group("wide", 3, n=3))  # needs 3 slots, 2 free
    s.add(group("small", 3))  # would fit, but must not jump the queue
    assert s.schedule().admitted == []
    s.finish(s.running[0].seqs[0], "length")
    assert [g.request_id for g in s.schedule().admitted] == ["wide"]


def test_token_budget_limits_admission_prefill():
    s = make(slots=4, max_batch_size=4, max_tokens_per_step=10, prefill_chunk=100)
    s.add(group("a", 7))
    s.add(group("b", 7))
    out = s.schedule()
    assert [(c.seq.group.request_id, len(c.tokens)) for c in out.chunks] == [("a", 7), ("b", 3)]
    assert out.num_tokens == 10


def test_abort_frees_slots_in_waiting_and_running():
    s = make(slots=2, max_batch_size=2)
    s.add(group("a", 3, n=2))
    s.add(group("b", 3))
    out = s.schedule()
    assert s.cache.num_free == 0 and [g.request_id for g in out.admitted] == ["a"]
    assert s.abort("b").seqs[0].finish_reason == "abort" and not s.waiting
    assert s.abort("a") is not None and s.cache.num_free == 2 and not s.running
    assert s.abort("nope") is None


def test_queue_full_and_prompt_too_long():
    s = make(slots=1, context=16, max_batch_size=1, max_waiting=2)
    s.add(group("a", 3))  # starts at the next step
    s.add(group("b", 3))  # these two wait
    s.add(group("c", 3))
    with pytest.raises(QueueFull, match="queue is full"):
        s.add(group("c2", 3))
    with pytest.raises(PromptTooLong, match="prompt has 16 tokens but the context limit is 16") as e:
        s.add(group("d", 16))
    assert (e.value.prompt_tokens, e.value.context_limit) == (16, 16)
    with pytest.raises(EngineError, match="n=2 exceeds"):
        s.add(group("e", 3, n=2))


def test_n_siblings_fork_after_the_prompt():
    s = make(slots=4, max_batch_size=4, max_tokens_per_step=64)
    s.add(group("a", 4, n=3))
    out = s.schedule()
    assert len(out.chunks) == 1  # only the first sequence prefills
    run_model(s, out)
    seqs = s.running[0].seqs
    assert [q.status for q in seqs] == ["decode"] * 3 and [q.computed for q in seqs] == [4] * 3
    assert len(s.schedule().chunks) == 3


def test_cache_plan_fits_memory_and_shrinks_context_rather_than_refusing():
    assert plan_cache(100, 1024, 8, memory_bytes=100 * 1024 * 3) == CachePlan(3, 1024, 100)
    shrunk = plan_cache(100, 1024, 8, memory_bytes=100 * 500)
    assert (shrunk.slots, shrunk.context_limit, shrunk.shrunk_from) == (1, 500, 1024)
    with pytest.raises(EngineError, match="holds 5 tokens"):
        plan_cache(100, 1024, 8, memory_bytes=500)
    cache = KVCacheManager(CachePlan(2, 10, 4))
    a, b = cache.allocate(2)
    cache.lengths[a] = 5
    u = cache.usage()
    assert (u.bytes_used, u.bytes_total, u.used_perc, u.reserved_perc) == (20, 80, 0.25, 1.0)


def test_runner_call_grouping():
    from ragtop.runtime.runners.base import Chunk, group_chunks

    chunks = [
        Chunk(3, [1], 5),
        Chunk(0, [1, 2], 0),
        Chunk(1, [1, 2], 0),
        Chunk(5, [1], 2),
        Chunk(4, [1, 2], 0),
        Chunk(2, [1, 2, 3], 0),
        Chunk(6, [1, 2], 7),
    ]
    assert group_chunks(chunks) == [[0, 3], [1, 2], [4], [6], [5]]
