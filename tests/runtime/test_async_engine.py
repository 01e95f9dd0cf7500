"""AsyncEngine: streaming, concurrency, abort, errors; synchronised by events, not sleeps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from ragtop.runtime import (
    AsyncEngine,
    EngineConfig,
    IterationStats,
    LLMEngine,
    PromptTooLong,
    QueueFull,
    Request,
    SamplingParams,
    SchedulerConfig,
)
from ragtop.runtime.runners.base import Chunk

from .conftest import CharTokenizer, FakeRunner

WAIT = 30  # seconds: a generous bound for events, never a timing assertion


class GatedRunner(FakeRunner):
    """Each forward waits for a permit, and announces that it entered."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)

    def forward(self, chunks: Sequence[Chunk]):
        self.entered.release()
        assert self.permits.acquire(timeout=WAIT), "test never released the runner"
        return super().forward(chunks)


def make_engine(runner, **sched) -> AsyncEngine:
    return AsyncEngine(LLMEngine(runner, CharTokenizer(), [49], EngineConfig(SchedulerConfig(**sched)))).start()


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_concurrent_streams():
    async def main():
        engine = make_engine(FakeRunner())

        async def one(i: int):
            outs = [o async for o in await engine.generate(Request(f"r{i}", [i], greedy(5)))]
            return [t for o in outs for d in o.deltas for t in d.token_ids], outs[-1]

        results = await asyncio.gather(*(one(i) for i in range(6)))
        await engine.shutdown()
        return results

    for i, (tokens, last) in enumerate(asyncio.run(main())):
        assert tokens == [i + 1, i + 2, i + 3, i + 4, i + 5]
        assert last.finished and last.usage.completion_tokens == 5


def test_abort_when_the_consumer_leaves_frees_the_slot_and_the_loop_never_blocks():
    runner = GatedRunner()
    aborted = threading.Event()

    def on_stats(s: IterationStats) -> None:
        if any(f.request_id == "long" and f.finish_reason == "abort" for f in s.finished):
            aborted.set()

    async def main():
        engine = make_engine(runner, max_batch_size=1)
        engine.engine.stats_listeners.append(on_stats)
        stream = await engine.generate(Request("long", [0], greedy(1000)))
        assert await in_thread(runner.entered.acquire, True, WAIT)  # the engine thread is inside forward
        # the model is running and holds no lock: the event loop can queue more work meanwhile
        queued = await engine.generate(Request("next", [5], greedy(2)))
        runner.permits.release()
        first = await anext(stream)
        assert first.deltas[0].token_ids == (1,)
        await stream.aclose()  # the client went away
        for _ in range(50):  # let the engine run: abort applies at the next step
            runner.permits.release()
        assert await in_thread(aborted.wait, WAIT)
        tokens = [t async for o in queued for d in o.deltas for t in d.token_ids]
        await engine.shutdown()
        return tokens

    assert asyncio.run(main()) == [6, 7]


def test_explicit_abort_ends_the_stream_with_reason_abort():
    runner = GatedRunner()

    async def main():
        engine = make_engine(runner)
        stream = await engine.generate(Request("r", [0], greedy(1000)))
        runner.permits.release()
        await anext(stream)
        engine.abort("r")
        for _ in range(5):
            runner.permits.release()
        rest = [o async for o in stream]
        await engine.shutdown()
        return rest

    rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].deltas[-1].finish_reason == "abort"


def test_errors_raise_in_the_caller():
    async def main():
        engine = make_engine(GatedRunner(), max_batch_size=1, max_waiting=1)
        with pytest.raises(PromptTooLong):
            await engine.generate(Request("x", [1] * 100))
        await engine.generate(Request("a", [1], greedy(3)))
        assert await in_thread(engine.engine.runner.entered.acquire, True, WAIT)  # a holds the one slot
        await engine.generate(Request("b", [1], greedy(3)))  # waits: the queue is now full
        with pytest.raises(QueueFull):
            await engine.generate(Request("c", [1], greedy(3)))
        engine.engine.runner.permits.release(100)
        await engine.shutdown()

    asyncio.run(main())
