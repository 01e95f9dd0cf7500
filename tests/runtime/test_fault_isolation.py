"""Fault isolation in the engine: a request whose generation fails ends alone, with an error;
a failing model call fails only the requests of that call; a runner that stays broken makes
the engine declare itself dead (and an AsyncEngine tells every stream and its owner)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ragtop.runtime import (
    AsyncEngine,
    EngineConfig,
    EngineDead,
    LLMEngine,
    Request,
    RequestFailed,
    SamplingParams,
    SchedulerConfig,
)

from .conftest import CharTokenizer, FakeRunner

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


class FaultyRunner(FakeRunner):
    """The fake runner, with faults on demand: raise on chosen calls (1-based), NaN logits for
    a chosen prompt token, or raise on every call from some call on."""

    def __init__(self, raise_on_calls=(), nan_after_token=None, broken_from=None) -> None:
        super().__init__()
        self.raise_on_calls, self.nan_after_token, self.broken_from = set(raise_on_calls), nan_after_token, broken_from

    def forward(self, chunks):
        n = len(self.calls) + 1
        if n in self.raise_on_calls or (self.broken_from is not None and n >= self.broken_from):
            self.calls.append(list(chunks))
            raise RuntimeError(f"injected fault on call {n}")
        out = super().forward(chunks)
        for i, c in enumerate(chunks):
            if out[i] is not None and self.nan_after_token is not None and self.nan_after_token in c.tokens:
                out[i] = np.full(self.spec.vocab_size, np.nan, dtype=np.float32)
        return out


class BrokenTokenizer(CharTokenizer):
    """Decoding token 7 raises (a detokenizer bug that only some requests reach)."""

    def decode(self, ids, skip_special_tokens=True):
        if 7 in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return super().decode(ids, skip_special_tokens)


def engine_with(runner, tokenizer=None, **sched) -> LLMEngine:
    return LLMEngine(runner, tokenizer or CharTokenizer(), config=EngineConfig(SchedulerConfig(**sched)))


def run(engine: LLMEngine, requests):
    outputs = engine.run_until_done(requests)
    return {rid: outs[-1] for rid, outs in outputs.items()}, outputs


def test_nan_logits_fail_only_that_request():
    engine = engine_with(FaultyRunner(nan_after_token=30))
    last, outputs = run(
        engine, [Request("ok", [1, 2], GREEDY), Request("bad", [30], GREEDY), Request("ok2", [3], GREEDY)]
    )
    assert last["bad"].finished and isinstance(last["bad"].error, RequestFailed)
    assert "non-finite logits" in str(last["bad"].error) and last["bad"].error.status == 500
    for rid in ("ok", "ok2"):
        assert last[rid].error is None and last[rid].usage.completion_tokens == 6
    assert engine.cache.num_free == engine.cache_plan.slots  # every slot came back
    # and the engine keeps serving
    last, _ = run(engine, [Request("after", [5], GREEDY)])
    assert last["after"].usage.completion_tokens == 6


def test_a_detokenizer_fault_fails_only_that_request():
    engine = engine_with(FakeRunner(), BrokenTokenizer())
    last, _ = run(engine, [Request("bad", [5], GREEDY), Request("ok", [10], GREEDY)])  # 5 -> 6 -> 7: raises
    assert isinstance(last["bad"].error, RequestFailed) and "UnicodeDecodeError" in str(last["bad"].error)
    assert last["ok"].error is None and last["ok"].usage.completion_tokens == 6


def test_a_failing_forward_fails_that_batch_and_the_engine_goes_on():
    runner = FaultyRunner(raise_on_calls={3})
    engine = engine_with(runner)
    stats = []
    engine.stats_listeners.append(stats.append)
    last, _ = run(engine, [Request("a", [1], GREEDY), Request("b", [2], GREEDY)])
    failed = [rid for rid, out in last.items() if out.error is not None]
    assert failed and all("injected fault on call 3" in str(last[r].error) for r in failed)
    assert any(f.finish_reason == "error" for s in stats for f in s.finished)
    assert engine.cache.num_free == engine.cache_plan.slots
    last, _ = run(engine, [Request("c", [4], GREEDY)])
    assert last["c"].error is None and last["c"].usage.completion_tokens == 6


def test_a_runner_that_stays_broken_kills_the_engine():
    engine = engine_with(FaultyRunner(broken_from=2))
    engine.add_request(Request("a", [1], GREEDY))
    engine.step()  # call 1: prefill works
    with pytest.raises(EngineDead, match="one-token probe"):
        engine.step()  # call 2 fails, and so does the probe (call 3)


def test_async_engine_streams_fail_cleanly_and_the_owner_is_told():
    async def main():
        engine = AsyncEngine(engine_with(FaultyRunner(broken_from=4))).start()
        fatal = []
        engine.on_fatal.append(fatal.append)
        stream = await engine.generate(Request("a", [1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)))
        seen = []
        with pytest.raises(RequestFailed, match="the engine stopped") as e:
            async for out in stream:
                seen.append(out)
        assert e.value.status == 503 and seen  # outputs before the fault were delivered
        assert fatal and isinstance(engine.error, EngineDead)
        with pytest.raises(EngineDead):
            await engine.generate(Request("b", [1], GREEDY))
        await engine.shutdown()

    asyncio.run(main())


def test_fail_all_ends_every_open_request():
    async def main():
        runner = FakeRunner()
        forward = runner.forward

        def slow(chunks):
            import time

            time.sleep(0.01)
            return forward(chunks)

        runner.forward = slow
        engine = AsyncEngine(engine_with(runner)).start()
        streams = [
            await engine.generate(Request(f"r{i}", [i], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)))
            for i in range(3)
        ]
        await asyncio.sleep(0.05)
        assert engine.fail_all("shutting down", 503) == 3
        for s in streams:
            with pytest.raises(RequestFailed, match="shutting down"):
                async for _ in s:
                    pass
        while engine.engine.has_work():
            await asyncio.sleep(0.01)
        assert engine.engine.cache.num_free == engine.engine.cache_plan.slots
        await engine.shutdown()

    asyncio.run(main())
