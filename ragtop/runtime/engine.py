"""LLMEngine (synchronous `step()`) and AsyncEngine (asyncio front, engine loop in a thread).

One step: apply aborts -> schedule (scheduler.py) -> run the model on the decode chunks and
the prefill chunks (runner) -> sample (sampling.py) -> detokenize and match stop strings
(detokenize.py) -> per-request deltas and one IterationStats. The engine works in token ids;
the tokenizer only turns generated ids into text.

Threading: `add_request` and `abort_request` may be called from any thread. A lock guards
the scheduler's state; the engine thread holds it to schedule and to sample, never while the
model runs, so callers (the event loop) wait at most for bookkeeping, not for a forward pass. Aborts are applied at the start of the
next step, which frees their slots.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from .detokenize import Decoder, IncrementalDetokenizer, StopStringMatcher
from .errors import EngineError, InvalidRequest
from .kv_cache import KVCacheManager, plan_cache
from .runners.base import Chunk, ModelRunner
from .sampling import SampledToken, SamplingParams, SequenceSampler
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SequenceGroup
from .scheduler import Sequence as Seq
from .stats import FinishedRequestStats, IterationStats

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    context_limit: int | None = None  # per sequence; default the model's
    cache_memory_bytes: int | None = None  # KV-cache budget; default: one slot per batch row


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class CompletionDelta:
    """What one sequence produced in one step."""

    index: int  # which of the request's n sequences
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    deltas: tuple[CompletionDelta, ...]
    finished: bool = False
    usage: Usage | None = None  # set on the last output


@dataclass(eq=False)
class _SeqState:
    sampler: SequenceSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    last_token_time: float | None = None
    stop_reason: str | int | None = None


@dataclass(eq=False)
class _RequestState:
    request: Request
    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    seqs: dict[int, _SeqState] = field(default_factory=dict)  # by sequence index


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Decoder, eos_token_ids: Iterable[int] = (),
                 config: EngineConfig | None = None) -> None:
        self.runner, self.tokenizer = runner, tokenizer
        self.config = config or EngineConfig()
        self.eos_token_ids = frozenset(eos_token_ids)
        spec = runner.spec
        sc = self.config.scheduler
        self.cache_plan = plan_cache(spec.kv_bytes_per_token, spec.max_model_len, sc.max_batch_size,
                                     self.config.context_limit, self.config.cache_memory_bytes)
        runner.allocate(self.cache_plan.slots, self.cache_plan.context_limit)
        self.cache = KVCacheManager(self.cache_plan)
        self.scheduler = Scheduler(sc, self.cache)
        self._lock = threading.Lock()
        self._aborts: list[str] = []
        self._groups: dict[str, SequenceGroup] = {}
        self.stats_listeners: list[Callable[[IterationStats], None]] = []

    # -- requests (any thread) --------------------------------------------------------
    @property
    def context_limit(self) -> int:
        return self.cache_plan.context_limit

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise InvalidRequest / PromptTooLong / QueueFull."""
        p = request.params
        p.validate(self.runner.spec.vocab_size)
        prompt = [int(t) for t in request.prompt_token_ids]
        if not prompt:
            raise InvalidRequest("the prompt is empty: give at least one token")
        if any(not 0 <= t < self.runner.spec.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt token ids must be in 0..{self.runner.spec.vocab_size - 1}")
        state = _RequestState(request, time.monotonic())
        group = SequenceGroup(request.request_id, prompt, p.n, data=state)
        parent = SequenceSampler(p, prompt, self.runner.spec.vocab_size, self.eos_token_ids, p.seed)
        for s in group.seqs:
            sampler = parent if s.index == 0 else parent.fork(None if p.seed is None else p.seed + s.index)
            state.seqs[s.index] = _SeqState(sampler, IncrementalDetokenizer(self.tokenizer, prompt), StopStringMatcher(p.stop))
        with self._lock:
            if request.request_id in self._groups:
                raise EngineError(f"request id {request.request_id!r} is already running")
            self.scheduler.add(group)
            self._groups[request.request_id] = group

    def abort_request(self, request_id: str) -> None:
        """Stop a request; its slots are freed at the start of the next step."""
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work() or bool(self._aborts)

    # -- one step (the engine thread) ---------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: dict[str, list[CompletionDelta]] = {}
        finished: list[FinishedRequestStats] = []
        with self._lock:
            for rid in self._aborts:
                group = self.scheduler.abort(rid)
                if group is not None:
                    outputs[rid] = [CompletionDelta(s.index, "", (), finish_reason="abort")
                                    for s in group.seqs if s.finish_reason == "abort"]
            self._aborts.clear()
            plan = self.scheduler.schedule()
        now = time.monotonic()
        for g in plan.admitted:
            g.data.admitted = now

        decode = [c for c in plan.chunks if len(c.tokens) == 1 and c.seq.status == "decode"]
        prefill = [c for c in plan.chunks if not (len(c.tokens) == 1 and c.seq.status == "decode")]
        t0 = time.perf_counter()
        decode_logits = self._forward(decode)
        t1 = time.perf_counter()
        prefill_logits = self._forward(prefill)
        t2 = time.perf_counter()

        ttfts: list[float] = []
        itls: list[float] = []
        with self._lock:
            now = time.monotonic()
            for chunk, logits in (*zip(decode, decode_logits, strict=True), *zip(prefill, prefill_logits, strict=True)):
                self.scheduler.advance(chunk)
                if logits is None or not chunk.samples:
                    continue
                for seq in self._seqs_sampling(chunk):
                    delta = self._sample(seq, logits, now, ttfts, itls)
                    outputs.setdefault(seq.group.request_id, []).append(delta)
            results = [self._request_output(rid, deltas, now, finished) for rid, deltas in outputs.items()]
            num_running, num_waiting = self.scheduler.num_running, len(self.scheduler.waiting)
        t3 = time.perf_counter()
        generated = sum(len(d.token_ids) for deltas in outputs.values() for d in deltas)
        self._emit_stats(plan.chunks, decode, t1 - t0, t2 - t1, t3 - t2, num_running, num_waiting,
                         generated, ttfts, itls, finished)
        return results

    def _forward(self, chunks: list[ScheduledChunk]) -> list[Tensor | None]:
        if not chunks:
            return []
        return self.runner.forward([Chunk(c.seq.slot, c.tokens, c.start, "last" if c.samples else "none") for c in chunks])

    def _seqs_sampling(self, chunk: ScheduledChunk) -> list[Seq]:
        """The sequence itself, plus its siblings when its prompt's prefill just ended (n > 1)."""
        seq = chunk.seq
        if seq.index != 0 or len(seq.tokens) != seq.prompt_len:
            return [seq]
        children = self.scheduler.fork(seq.group)
        for child in children:
            self.runner.copy_slot(seq.slot, child.slot, seq.computed)
        return [seq, *children]

    def _sample(self, seq: Seq, logits: Tensor, now: float, ttfts: list[float], itls: list[float]) -> CompletionDelta:
        req: _RequestState = seq.group.data
        st = req.seqs[seq.index]
        p = req.request.params
        sampled: SampledToken = st.sampler.sample(logits)
        token = sampled.token
        self.scheduler.append_token(seq, token)
        if req.first_token is None:
            req.first_token = now
            ttfts.append(now - req.arrival)
        if st.last_token_time is not None:
            itls.append(now - st.last_token_time)
        st.last_token_time = now

        reason: FinishReason | None = None
        text = ""
        if token in p.stop_token_ids:
            reason, st.stop_reason = "stop", token
        elif token in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        else:
            text = st.stops.feed(st.detok.add([token]))
            if st.stops.stopped is not None:
                reason, st.stop_reason = "stop", st.stops.stopped
        n_out = len(seq.tokens) - seq.prompt_len
        if reason is None and (n_out >= p.max_tokens or len(seq.tokens) >= self.context_limit):
            reason = "length"
        if reason is not None:
            if st.stops.stopped is None:
                text += st.stops.feed(st.detok.flush()) + st.stops.flush()
            self.scheduler.finish(seq, reason)
        logprobs = None
        if sampled.logprob is not None:
            logprobs = (TokenLogprob(token, sampled.logprob, sampled.top),)
        return CompletionDelta(seq.index, text, (token,), logprobs, reason, st.stop_reason if reason else None)

    def _request_output(self, rid: str, deltas: list[CompletionDelta], now: float,
                        finished: list[FinishedRequestStats]) -> RequestOutput:
        group = self._groups[rid]
        if not group.finished:
            return RequestOutput(rid, tuple(deltas), False)
        del self._groups[rid]
        finished.append(self._finish_stats(group, now))
        usage = Usage(len(group.prompt), sum(len(s.output) for s in group.seqs))
        return RequestOutput(rid, tuple(deltas), True, usage)

    def _finish_stats(self, group: SequenceGroup, now: float) -> FinishedRequestStats:
        req: _RequestState = group.data
        return FinishedRequestStats(
            request_id=group.request_id,
            finish_reason=group.seqs[0].finish_reason or "abort",
            prompt_tokens=len(group.prompt),
            generation_tokens=sum(len(s.output) for s in group.seqs),
            queue_time_s=(req.admitted or now) - req.arrival,
            time_to_first_token_s=None if req.first_token is None else req.first_token - req.arrival,
            e2e_latency_s=now - req.arrival,
        )

    def _emit_stats(self, chunks: list[ScheduledChunk], decode: list[ScheduledChunk], decode_s: float,
                    prefill_s: float, sample_s: float, num_running: int, num_waiting: int, generated: int,
                    ttfts: list[float], itls: list[float], finished: list[FinishedRequestStats]) -> None:
        if not self.stats_listeners:
            return
        usage = self.cache.usage()
        stats = IterationStats(
            timestamp=time.time(),
            runner=self.runner.spec.name,
            attention=self.runner.spec.attention,
            batch_size=len(chunks),
            num_running=num_running,
            num_waiting=num_waiting,
            prompt_tokens=sum(len(c.tokens) for c in chunks if c not in decode),
            generation_tokens=generated,
            prefill_time_s=prefill_s,
            decode_time_s=decode_s,
            sample_time_s=sample_s,
            context_lengths=[c.start + 1 for c in decode],
            kv_cache_bytes_used=usage.bytes_used,
            kv_cache_bytes_total=usage.bytes_total,
            kv_cache_usage_perc=usage.used_perc,
            kv_cache_reserved_perc=usage.reserved_perc,
            time_to_first_tokens_s=ttfts,
            inter_token_latencies_s=itls,
            finished=finished,
        )
        for listener in self.stats_listeners:
            listener(stats)

    def close(self) -> None:
        """Free the runner's cache (the engine is unusable afterwards)."""
        self.runner.close()

    # -- conveniences -------------------------------------------------------------------
    def run_until_done(self, requests: Sequence[Request] = ()) -> dict[str, list[RequestOutput]]:
        """Add the requests and step until the engine is idle; outputs by request id."""
        for r in requests:
            self.add_request(r)
        outputs: dict[str, list[RequestOutput]] = {}
        while self.has_work():
            for out in self.step():
                outputs.setdefault(out.request_id, []).append(out)
        return outputs


class AsyncEngine:
    """asyncio front of an LLMEngine whose loop runs in its own thread.

    `generate(request)` validates and queues synchronously (so InvalidRequest, PromptTooLong
    and QueueFull raise in the caller) and returns an async iterator of RequestOutputs.
    Leaving the iteration early (client gone, task cancelled) aborts the request.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what killed the loop, if anything

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ragtop-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # the runner failed: fail every stream, stop
                self.error = e
                for loop, queue in list(self._streams.values()):
                    self._deliver(loop, queue, e)
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    self._deliver(*stream, out)

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody listens
            pass

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue the request now; the returned iterator yields its outputs as they come."""
        if self.error is not None:
            raise EngineError(f"the engine loop stopped: {self.error}")
        queue: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        if rid in self._streams:
            raise EngineError(f"request id {rid!r} is already running")
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(request)
        except BaseException:
            del self._streams[rid]
            raise
        self._wake.set()
        return self._stream(rid, queue)

    async def _stream(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"the engine loop stopped: {item}") from item
                done = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not done:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wake.set()

    async def shutdown(self) -> None:
        """Stop the loop thread (waited for off the event loop)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        self.engine.close()
