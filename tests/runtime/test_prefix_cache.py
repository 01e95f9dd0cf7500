"""Prefix matching and slot choice in the KV-cache manager, and the engine's use of it (fake runner)."""

from __future__ import annotations

from ragtop.runtime import EngineConfig, LLMEngine, Request, SamplingParams, SchedulerConfig
from ragtop.runtime.kv_cache import CachePlan, KVCacheManager

from .conftest import CharTokenizer, FakeRunner


def manager(slots=4, context=64, block=16, caching=True) -> KVCacheManager:
    return KVCacheManager(CachePlan(slots, context, 8), caching, block)


def test_matches_are_whole_blocks_and_leave_a_token_to_compute():
    m = manager()
    (s,) = m.allocate(1)
    m.free(s, list(range(40)))
    assert m.match(list(range(40)) + [99]).tokens == 32  # 40 common -> 2 whole blocks
    assert m.match(list(range(33))).tokens == 32
    assert m.match(list(range(32))).tokens == 16  # all 32 cached, but one must be computed
    assert m.match(list(range(10)) + [7] * 30) is None  # 10 common: less than a block
    assert m.match([1] + list(range(1, 40))) is None  # differs at the first token


def test_a_hit_takes_that_slot_and_misses_evict_the_least_recently_used():
    m = manager(slots=3)
    a, b, c = m.allocate(3)
    m.free(b, [1] * 20)
    m.free(a, [2] * 20)
    m.free(c, [3] * 20)
    hit = m.match([2] * 20)
    assert (hit.slot, hit.copy) == (a, False)
    assert m.allocate(1, prefer=hit.slot) == [a]
    assert m.allocate(1) == [b]  # no match: the least recently freed goes first
    assert m.match([1] * 20) is None and m.match([3] * 20).slot == c


def test_running_sequences_are_matched_for_a_copy_and_free_slots_preferred_on_ties():
    m = manager(slots=3)
    a, b = m.allocate(2)
    m.free(a, [4] * 30)
    hit = m.match([4] * 30 + [5], running=[(b, [4] * 30)])
    assert (hit.tokens, hit.slot, hit.copy) == (16, a, False)
    hit = m.match([4] * 40 + [5], running=[(b, [4] * 40)])
    assert (hit.tokens, hit.slot, hit.copy) == (32, b, True)


def test_no_caching_when_disabled_and_nothing_kept_after_an_error():
    m = manager(caching=False)
    (s,) = m.allocate(1)
    m.free(s, list(range(40)))
    assert m.match(list(range(41))) is None
    engine = LLMEngine(FakeRunner(), CharTokenizer(), config=EngineConfig(SchedulerConfig()))
    engine.cache.free(engine.cache.allocate(1)[0], ())
    assert all(h is None for h in engine.cache.held)


def test_engine_prefills_only_the_uncached_part_and_reports_it():
    runner = FakeRunner()
    engine = LLMEngine(runner, CharTokenizer(), config=EngineConfig(SchedulerConfig(prefill_chunk=64)))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    doc = [i % 40 for i in range(35)]
    first = engine.run_until_done([Request("a", doc + [1], params)])["a"]
    runner.calls.clear()
    second = engine.run_until_done([Request("b", doc + [2, 3], params)])["b"]
    assert first[-1].usage.cached_tokens == 0 and second[-1].usage.cached_tokens == 32
    prefill = runner.calls[0][0]
    assert prefill.start == 32 and list(prefill.tokens) == (doc + [2, 3])[32:]


def test_a_short_match_copies_rather_than_evicting_a_longer_cache():
    m = manager(slots=3)
    (a,) = m.allocate(1)
    m.free(a, list(range(50)))
    hit = m.match(list(range(20)) + [99] * 5)  # 16 of a's 50 tokens
    assert (hit.tokens, hit.slot, hit.copy) == (16, a, True)
    (b,) = m.allocate(1, avoid=a)
    assert b != a and m.match(list(range(45))).tokens == 32  # a still holds the long prefix
    full = m.match(list(range(50)) + [1])
    assert (full.tokens, full.copy) == (48, False)  # 50 - 48 < a block: take the slot itself
