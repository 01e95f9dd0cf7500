"""LLMEngine (synchronous `step()`) and AsyncEngine (asyncio front, engine loop in a thread).

One step: apply aborts -> schedule (scheduler.py) -> run the model on the decode chunks and
the prefill chunks (runner) -> sample (sampling.py) -> detokenize and match stop strings
(detokenize.py) -> per-request deltas and one IterationStats. The engine works in token ids;
the tokenizer only turns generated ids into text.

Fault isolation: an exception while sampling, detokenizing or matching stops for one sequence
ends that request with an error (`RequestOutput.error`) and the step goes on for the others.
An exception in a runner's forward fails the requests of that model call; then a one-token
probe forward in a free slot tells whether the runner still works. If it does not (or
forwards keep failing), the engine raises `EngineDead`: nothing more can be served, and a
server exits so that its supervisor restarts it.

Threading: `add_request` and `abort_request` may be called from any thread. A lock guards
the scheduler's state; the engine thread holds it to schedule and to sample, never while the
model runs, so callers (the event loop) wait at most for bookkeeping, not for a forward pass.
Aborts are applied at the start of the next step, which frees their slots.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .detokenize import Decoder, IncrementalDetokenizer, StopStringMatcher
from .errors import EngineDead, EngineError, InvalidRequest, RequestFailed
from .kv_cache import PREFIX_BLOCK, KVCacheManager, PagedKVCacheManager, plan_cache, plan_pages
from .runners.base import Chunk, ModelRunner
from .sampling import SampledToken, SamplingParams, SequenceSampler
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput, SequenceGroup
from .scheduler import Sequence as Seq
from .stats import FinishedRequestStats, IterationStats

log = logging.getLogger("ragtop.engine")

FinishReason = Literal["stop", "length", "abort", "error"]
MAX_CONSECUTIVE_FORWARD_FAILURES = 3  # then the runner is taken as broken even if a probe passes


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    context_limit: int | None = None  # per sequence; default the model's
    cache_memory_bytes: int | None = None  # KV-cache budget; default: one slot per batch row
    prefix_caching: bool = True  # reuse cached prompt prefixes (kv_cache.py)
    speculative_tokens: int = 0  # default draft length of self-speculative decoding (0: off)
    # A sparse model that can attend densely on demand (runner spec.dense_chunks) attends
    # densely where sparse attention saves no time: prompt chunks whose context ends at or
    # below dense_prefill_tokens, decode steps at contexts up to dense_decode_tokens (0: never;
    # docs/runtime.md, "Dense where sparse attention does not pay")
    dense_prefill_tokens: int = 0
    dense_decode_tokens: int = 0

    def __post_init__(self) -> None:
        check_speculative_tokens(self.speculative_tokens, EngineError)


MAX_SPECULATIVE_TOKENS = 16  # drafts per round: more costs a longer dense pass for little gain
# `ragtop serve`'s dense_prefill_tokens / dense_decode_tokens: where dense attention was measured
# as fast as block selection on SmolLM2 (docs/runtime.md, "Dense where sparse attention does not
# pay", scripts/dense_sparse_crossover.py: dense prefill faster up to ~6k tokens and as fast at
# 8k; sparse decoding 0.99-1.00x dense up to 2k, 1.11x at 4k)
SERVED_DENSE_PREFILL_TOKENS = 8192
SERVED_DENSE_DECODE_TOKENS = 2048


def check_speculative_tokens(gamma: int, error: type[Exception] = InvalidRequest) -> None:
    if not 0 <= gamma <= MAX_SPECULATIVE_TOKENS:
        args = ("num_speculative_tokens",) if error is InvalidRequest else ()
        raise error(f"num_speculative_tokens must be in 0..{MAX_SPECULATIVE_TOKENS} (0: off), got {gamma}", *args)


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # self-speculative decoding: drafts per dense verification; None = EngineConfig's default.
    # Greedy requests only (sampled ones decode normally); the output is the dense model's.
    num_speculative_tokens: int | None = None


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
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not computed)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    deltas: tuple[CompletionDelta, ...]
    finished: bool = False
    usage: Usage | None = None  # set on the last output
    error: RequestFailed | None = None  # set (with finished) when generating the request failed


@dataclass(eq=False)
class _Speculation:
    """A speculating sequence's round: `drafts` proposed so far by the sparse model from the
    round's start (the sequence's `computed`, which stays put until the verification)."""

    gamma: int
    drafts: list[int] = field(default_factory=list)
    # a sampled request's drafts are drawn, not argmax: the distribution each came from
    # (speculative rejection sampling needs it at verification)
    draft_probs: list[np.ndarray] = field(default_factory=list)


@dataclass(eq=False)
class _SeqState:
    sampler: SequenceSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    last_token_time: float | None = None
    stop_reason: str | int | None = None
    spec: _Speculation | None = None  # self-speculative decoding (requests that ask for it)


@dataclass(eq=False)
class _Call:
    """One chunk of a step as the runner sees it. `plain`: what the scheduler planned (dense
    for a speculating sequence); `draft`: one sparse token of a speculation round, kept out
    of the sequence; `verify`: the round's dense pass over its last token + the drafts."""

    chunk: ScheduledChunk
    run: Chunk
    kind: Literal["plain", "draft", "verify"] = "plain"


@dataclass(eq=False)
class _RequestState:
    request: Request
    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    seqs: dict[int, _SeqState] = field(default_factory=dict)  # by sequence index


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Decoder,
        eos_token_ids: Iterable[int] = (),
        config: EngineConfig | None = None,
    ) -> None:
        self.runner, self.tokenizer = runner, tokenizer
        self.config = config or EngineConfig()
        self.eos_token_ids = frozenset(eos_token_ids)
        spec = runner.spec
        sc = self.config.scheduler
        if spec.page_size:  # a paged cache: memory follows use (kv_cache.PagedKVCacheManager)
            pages = plan_pages(
                spec.kv_bytes_per_token,
                spec.max_model_len,
                spec.page_size,
                sc.max_batch_size,
                self.config.context_limit,
                self.config.cache_memory_bytes,
            )
            runner.allocate_pages(pages.num_pages)
            self.cache: KVCacheManager = PagedKVCacheManager(pages, self.config.prefix_caching)
            runner.block_tables = self.cache.tables
            self.cache_plan = self.cache.plan
        else:
            self.cache_plan = plan_cache(
                spec.kv_bytes_per_token,
                spec.max_model_len,
                sc.max_batch_size,
                self.config.context_limit,
                self.config.cache_memory_bytes,
            )
            runner.allocate(self.cache_plan.slots, self.cache_plan.context_limit)
            self.cache = KVCacheManager(
                self.cache_plan, self.config.prefix_caching, max(PREFIX_BLOCK, spec.capacity_multiple)
            )
        self.scheduler = Scheduler(sc, self.cache)
        if self.config.speculative_tokens and not spec.dense_chunks:
            raise EngineError(self._no_speculation_reason())
        # a model without the on-demand dense mode (a dense one, or an old export) attends as it is
        self._dense_up_to = {
            "prefill": self.config.dense_prefill_tokens if spec.dense_chunks else 0,
            "decode": self.config.dense_decode_tokens if spec.dense_chunks else 0,
        }
        self._lock = threading.Lock()
        self._aborts: list[str] = []
        self._groups: dict[str, SequenceGroup] = {}
        self._forward_failures = 0  # consecutive model calls that raised
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
            raise InvalidRequest("the prompt is empty: give at least one token", "prompt")
        vocab = self.runner.spec.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        gamma = self._speculative_tokens(request)
        state = _RequestState(request, time.monotonic())
        # a speculating request's cache holds dense keys/values: kept apart in the prefix cache
        group = SequenceGroup(request.request_id, prompt, p.n, data=state, dense_kv=gamma > 0, lookahead=gamma)
        parent = SequenceSampler(p, prompt, self.runner.spec.vocab_size, self.eos_token_ids, p.seed)
        for s in group.seqs:
            sampler = parent if s.index == 0 else parent.fork(None if p.seed is None else p.seed + s.index)
            state.seqs[s.index] = _SeqState(
                sampler,
                IncrementalDetokenizer(self.tokenizer, prompt),
                StopStringMatcher(p.stop),
                spec=_Speculation(gamma) if gamma else None,
            )
        with self._lock:
            if request.request_id in self._groups:
                raise EngineError(f"request id {request.request_id!r} is already running")
            self.scheduler.add(group)
            self._groups[request.request_id] = group

    def _speculative_tokens(self, request: Request) -> int:
        """The request's draft length: its own or the default. InvalidRequest when the
        request asks for speculation the model cannot do."""
        asked = request.num_speculative_tokens
        if asked is not None:
            check_speculative_tokens(asked)
            if asked and not self.runner.spec.dense_chunks:
                raise InvalidRequest(self._no_speculation_reason(), "num_speculative_tokens")
        return self.config.speculative_tokens if asked is None else asked

    def _no_speculation_reason(self) -> str:
        spec = self.runner.spec
        if spec.attention == "dense":
            return "self-speculative decoding needs a sparse (top-k) model: this model is dense already"
        return (
            f"this {spec.name} model cannot verify drafts densely: re-export it with this ragtop "
            "(its graph needs the attention_dense input)"
        )

    def abort_request(self, request_id: str) -> None:
        """Stop a request; its slots are freed at the start of the next step."""
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work() or bool(self._aborts)

    # -- one step (the engine thread) ---------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. Faults of single requests end those requests (their outputs carry
        `error`); raises EngineDead only when the runner no longer works at all."""
        outputs: dict[str, list[CompletionDelta]] = {}
        errors: dict[str, RequestFailed] = {}
        finished: list[FinishedRequestStats] = []
        with self._lock:
            for rid in self._aborts:
                group = self.scheduler.abort(rid)
                if group is not None:
                    outputs[rid] = [
                        CompletionDelta(s.index, "", (), finish_reason="abort")
                        for s in group.seqs
                        if s.finish_reason == "abort"
                    ]
            self._aborts.clear()
            plan = self.scheduler.schedule()
        now = time.monotonic()
        for g in plan.admitted:
            g.data.admitted = now
        for g in plan.preempted:  # recomputed from scratch: a round's drafts are gone with the pages
            for st in g.data.seqs.values():
                if st.spec is not None:
                    st.spec.drafts, st.spec.draft_probs = [], []
        for src, dst, n in plan.copies:  # prefixes cached in running sequences' slots
            try:
                self.runner.copy_slot(src, dst, n)
            except Exception as e:  # noqa: BLE001 - that request fails, the step goes on
                group = next(g for g in plan.admitted if g.seqs[0].slot == dst)
                errors[group.request_id] = _request_failure(e, "copying a cached prefix")

        calls = [self._call(c) for c in plan.chunks]
        decode = [c for c in calls if len(c.run.tokens) == 1 and c.chunk.seq.status == "decode"]
        prefill = [c for c in calls if not (len(c.run.tokens) == 1 and c.chunk.seq.status == "decode")]
        t0 = time.perf_counter()
        decode_logits = self._forward(decode, errors)
        t1 = time.perf_counter()
        prefill_logits = self._forward(prefill, errors)
        t2 = time.perf_counter()

        ttfts: list[float] = []
        itls: list[float] = []
        spec_counts = [0, 0]  # drafted, accepted
        with self._lock:
            now = time.monotonic()
            for call, logits in (*zip(decode, decode_logits, strict=True), *zip(prefill, prefill_logits, strict=True)):
                chunk = call.chunk
                rid = chunk.seq.group.request_id
                if rid in errors or chunk.seq.finished:  # finished: aborted during the forward
                    continue
                try:
                    if call.kind == "draft":
                        self._draft(chunk.seq, logits)
                        continue
                    if call.kind == "verify":
                        outputs.setdefault(rid, []).append(self._verify(call, logits, now, ttfts, itls, spec_counts))
                        continue
                    self.scheduler.advance(chunk)
                    if logits is None or not chunk.samples:
                        continue
                    for seq in self._seqs_sampling(chunk):
                        delta = self._sample(seq, logits, now, ttfts, itls)
                        outputs.setdefault(rid, []).append(delta)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    errors[rid] = _request_failure(e, "generating")
            for rid in errors:
                self.scheduler.abort(rid, "error")
                outputs.setdefault(rid, [])
            results = [
                self._request_output(rid, deltas, now, finished, errors.get(rid))
                for rid, deltas in outputs.items()
                if rid in self._groups
            ]
            num_running, num_waiting = self.scheduler.num_running, len(self.scheduler.waiting)
        t3 = time.perf_counter()
        generated = sum(len(d.token_ids) for deltas in outputs.values() for d in deltas)
        prompt_tokens = sum(len(c.run.tokens) for c in prefill if c.kind == "plain")
        self._emit_stats(
            plan,
            decode,
            prompt_tokens,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            num_running,
            num_waiting,
            generated,
            ttfts,
            itls,
            finished,
            spec_counts,
        )
        return results

    # -- self-speculative decoding ------------------------------------------------------
    def _call(self, c: ScheduledChunk) -> _Call:
        """What the runner computes for a scheduled chunk. A chunk attends densely up to the
        config's dense_prefill_tokens / dense_decode_tokens. A speculating sequence prefills
        densely, then per round drafts up to gamma tokens one step at a time with the sparse
        model (one-token chunks in the decode batch, beside everyone else's decodes), then
        verifies them in one dense chunk over [last token, drafts] at the round's start."""
        seq = c.seq
        spec = seq.group.data.seqs[seq.index].spec
        dense = spec is not None or c.start + len(c.tokens) <= self._dense_up_to.get(seq.status, 0)
        plain = Chunk(seq.slot, c.tokens, c.start, "last" if c.samples else "none", dense=dense)
        if spec is None or seq.status != "decode":
            return _Call(c, plain)
        gamma = self._round_gamma(seq, spec)
        if len(spec.drafts) < gamma:
            token = spec.drafts[-1] if spec.drafts else seq.tokens[-1]
            return _Call(c, Chunk(seq.slot, [token], c.start + len(spec.drafts), "last"), "draft")
        if not spec.drafts:  # no room left for a draft: one dense decode
            return _Call(c, plain)
        return _Call(c, Chunk(seq.slot, [seq.tokens[-1], *spec.drafts], c.start, "all", dense=True), "verify")

    def _round_gamma(self, seq: Seq, spec: _Speculation) -> int:
        """Drafts this round: gamma, fewer when max_tokens or the context would end the
        sequence sooner (a verification yields up to drafts + 1 tokens)."""
        p = seq.group.data.request.params
        left = min(p.max_tokens - (len(seq.tokens) - seq.prompt_len), self.context_limit - len(seq.tokens))
        return max(0, min(spec.gamma, left - 1))

    def _draft(self, seq: Seq, logits) -> None:
        """Record the sparse model's next draft: its argmax for a greedy request, else a
        draw from its distribution under the sequence's sampling parameters (kept for the
        rejection test at verification)."""
        st = seq.group.data.seqs[seq.index]
        if seq.group.data.request.params.greedy:
            st.spec.drafts.append(int(np.asarray(logits).argmax()))
            return
        token, q = st.sampler.draft(logits)
        st.spec.drafts.append(token)
        st.spec.draft_probs.append(q)

    def _verify(
        self, call: _Call, logits, now: float, ttfts: list[float], itls: list[float], spec_counts: list[int]
    ) -> CompletionDelta:
        """Sample from dense's logits after each position, keeping drafts while they agree:
        the tokens are distributed exactly as in plain dense decoding (same sampler, same
        stops; greedy: the very same tokens). A sampled request's draft is kept with
        probability min(1, p/q), else replaced by a draw from max(0, p - q) (speculative
        rejection sampling, `SequenceSampler.verify_draft`), so a replaced draft never equals
        the token that replaces it. The cache keeps the positions whose input tokens were
        accepted; drafts' traces in the runner (block summaries) are rebuilt from the kept keys."""
        seq, start = call.chunk.seq, call.run.start
        spec = seq.group.data.seqs[seq.index].spec
        drafts, rows = spec.drafts, np.asarray(logits)
        deltas = []
        for i in range(len(drafts) + 1):
            # positions start..start+i hold the sequence's own tokens (drafts 1..i matched)
            seq.computed = self.cache.lengths[seq.slot] = start + i + 1
            proposal = (drafts[i], spec.draft_probs[i]) if i < len(spec.draft_probs) else None
            deltas.append(self._sample(seq, rows[i], now, ttfts, itls, proposal))
            if seq.finished or i == len(drafts) or deltas[-1].token_ids[0] != drafts[i]:
                break
            spec_counts[1] += 1
        spec_counts[0] += len(drafts)
        self.runner.rollback(seq.slot, start + len(deltas), start)
        spec.drafts, spec.draft_probs = [], []
        return _merge_deltas(deltas)

    def _forward(self, calls: list[_Call], errors: dict[str, RequestFailed]) -> list[np.ndarray | None]:
        """Run the chunks; if the runner raises, their requests go to `errors` (and the
        runner is probed: EngineDead if it is broken)."""
        if not calls:
            return []
        try:
            out = self.runner.forward([c.run for c in calls])
        except Exception as e:  # noqa: BLE001 - this batch fails, the engine goes on if it can
            self._forward_failures += 1
            failure = _request_failure(e, "running the model")
            for c in calls:
                errors.setdefault(c.chunk.seq.group.request_id, failure)
            with self._lock:
                self._check_runner(e)
            return [None] * len(calls)
        self._forward_failures = 0
        return out

    def _check_runner(self, cause: BaseException) -> None:
        """After a failed forward: is the runner still usable? One token through a free slot."""
        if self._forward_failures >= MAX_CONSECUTIVE_FORWARD_FAILURES:
            raise EngineDead(f"{self._forward_failures} model calls in a row failed; the last: {cause}") from cause
        if not self.cache.can_allocate(1):
            return
        slot = self.cache.allocate(1)[0]
        if not self.cache.ensure(slot, 1):
            self.cache.free(slot)
            return
        try:
            logits = self.runner.forward([Chunk(slot, [0], 0, "last")])[0]
            ok = logits is not None and bool(np.isfinite(np.asarray(logits)).all())
        except Exception as e:  # noqa: BLE001 - the probe itself failed: the runner is broken
            raise EngineDead(f"the model runner failed ({cause}) and fails a one-token probe too ({e})") from e
        finally:
            self.cache.free(slot)
        if not ok:
            raise EngineDead(f"the model runner failed ({cause}) and a one-token probe gives non-finite logits")

    def _seqs_sampling(self, chunk: ScheduledChunk) -> list[Seq]:
        """The sequence itself, plus its siblings when its prompt's prefill just ended (n > 1)."""
        seq = chunk.seq
        if seq.index != 0 or len(seq.tokens) != seq.prompt_len:
            return [seq]
        if self.cache.paged:  # full pages shared, the partial last page copied
            for child in [s for s in seq.group.seqs if s.status == "fork"]:
                copies = self.cache.fork(seq.slot, child.slot, seq.computed)
                if copies is None:  # no page free: this sibling prefills the prompt itself
                    child.status = "prefill"
                else:
                    self.runner.copy_pages(copies)
        children = self.scheduler.fork(seq.group)
        if not self.cache.paged:
            for child in children:
                self.runner.copy_slot(seq.slot, child.slot, seq.computed)
        return [seq, *children]

    def _sample(
        self,
        seq: Seq,
        logits,
        now: float,
        ttfts: list[float],
        itls: list[float],
        proposal: tuple[int, np.ndarray] | None = None,
    ) -> CompletionDelta:
        """The sequence's next token from these logits (or, with a `proposal` (draft, q) of a
        sampled speculation round, the rejection test of that draft), then its stops."""
        req: _RequestState = seq.group.data
        st = req.seqs[seq.index]
        p = req.request.params
        sampled: SampledToken = (
            st.sampler.sample(logits) if proposal is None else st.sampler.verify_draft(logits, *proposal)
        )
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

    def _request_output(
        self,
        rid: str,
        deltas: list[CompletionDelta],
        now: float,
        finished: list[FinishedRequestStats],
        error: RequestFailed | None = None,
    ) -> RequestOutput:
        group = self._groups[rid]
        if not group.finished:
            return RequestOutput(rid, tuple(deltas), False)
        del self._groups[rid]
        finished.append(self._finish_stats(group, now))
        usage = Usage(len(group.prompt), sum(len(s.output) for s in group.seqs), group.cached_tokens)
        return RequestOutput(rid, tuple(deltas), True, usage, error)

    def _finish_stats(self, group: SequenceGroup, now: float) -> FinishedRequestStats:
        req: _RequestState = group.data
        return FinishedRequestStats(
            request_id=group.request_id,
            finish_reason=group.seqs[0].finish_reason or "abort",  # "error" when it failed
            prompt_tokens=len(group.prompt),
            generation_tokens=sum(len(s.output) for s in group.seqs),
            queue_time_s=(req.admitted or now) - req.arrival,
            time_to_first_token_s=None if req.first_token is None else req.first_token - req.arrival,
            e2e_latency_s=now - req.arrival,
        )

    def _emit_stats(
        self,
        plan: SchedulerOutput,
        decode: list[_Call],
        prompt_tokens: int,
        decode_s: float,
        prefill_s: float,
        sample_s: float,
        num_running: int,
        num_waiting: int,
        generated: int,
        ttfts: list[float],
        itls: list[float],
        finished: list[FinishedRequestStats],
        spec_counts: list[int],
    ) -> None:
        if not self.stats_listeners:
            return
        chunks = plan.chunks
        usage = self.cache.usage()
        stats = IterationStats(
            timestamp=time.time(),
            runner=self.runner.spec.name,
            attention=self.runner.spec.attention,
            batch_size=len(chunks),
            num_running=num_running,
            num_waiting=num_waiting,
            prompt_tokens=prompt_tokens,
            generation_tokens=generated,
            prefill_time_s=prefill_s,
            decode_time_s=decode_s,
            sample_time_s=sample_s,
            context_lengths=[c.run.start + 1 for c in decode],
            kv_cache_bytes_used=usage.bytes_used,
            kv_cache_bytes_total=usage.bytes_total,
            kv_cache_usage_perc=usage.used_perc,
            kv_cache_reserved_perc=usage.reserved_perc,
            kv_cache_blocks_used=usage.blocks_used,
            kv_cache_blocks_free=usage.blocks_total - usage.blocks_used,
            num_preemptions=len(plan.preempted),
            prefix_cache_queries=sum(len(g.prompt) for g in plan.admitted) if self.cache.prefix_caching else 0,
            prefix_cache_hits=sum(g.cached_tokens for g in plan.admitted),
            time_to_first_tokens_s=ttfts,
            inter_token_latencies_s=itls,
            finished=finished,
            spec_draft_tokens=spec_counts[0],
            spec_accepted_tokens=spec_counts[1],
        )
        for listener in self.stats_listeners:
            try:
                listener(stats)
            except Exception:  # noqa: BLE001 - a broken observer must not stop generation
                log.exception("a stats listener failed")

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


def _merge_deltas(deltas: list[CompletionDelta]) -> CompletionDelta:
    """One delta for the tokens one sequence produced in one step (a verification yields
    several): what a stream sends as one event."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    logprobs = None if last.logprobs is None else tuple(lp for d in deltas for lp in d.logprobs or ())
    return CompletionDelta(
        last.index,
        "".join(d.text for d in deltas),
        tuple(t for d in deltas for t in d.token_ids),
        logprobs,
        last.finish_reason,
        last.stop_reason,
    )


def _request_failure(e: BaseException, doing: str) -> RequestFailed:
    """The error a request ends with: RequestFailed as raised, or a wrapped unexpected fault."""
    if isinstance(e, RequestFailed):
        return e
    failure = RequestFailed(f"internal error while {doing}: {type(e).__name__}: {e}")
    failure.__cause__ = e
    return failure


class AsyncEngine:
    """asyncio front of an LLMEngine whose loop runs in its own thread.

    `generate(request)` validates and queues synchronously (so InvalidRequest, PromptTooLong
    and QueueFull raise in the caller) and returns an async iterator of RequestOutputs; when
    the request fails after it was accepted, the iterator raises RequestFailed (after the
    outputs produced before the fault). Leaving the iteration early (client gone, task
    cancelled) aborts the request.

    If the engine dies (EngineDead: the runner is broken), every open stream raises
    RequestFailed, `error` says why, and each `on_fatal` callback is called once from the
    engine thread: a server marks itself unhealthy and exits.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what killed the loop, if anything
        self.on_fatal: list[Callable[[BaseException], None]] = []

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
            except BaseException as e:  # noqa: BLE001 - EngineDead, or a bug in the engine itself
                self._die(e)
                return
            # One wake-up of each listening event loop per step, not one per output: with many
            # streams the loop otherwise spends as much CPU on wake-ups as the engine on the model.
            batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    batches.setdefault(stream[0], []).append((stream[1], out))
            for loop, items in batches.items():
                self._deliver_many(loop, items)

    def _die(self, e: BaseException) -> None:
        log.error("the engine stopped: %s", e, exc_info=not isinstance(e, EngineDead))
        self.error = e
        for callback in self.on_fatal:  # first, so that the owner is unhealthy before clients hear
            try:
                callback(e)
            except Exception:  # noqa: BLE001 - a broken callback must not hide the others
                log.exception("on_fatal callback failed")
        failure = RequestFailed(f"the engine stopped: {e}", status=503)
        for loop, queue in list(self._streams.values()):
            self._deliver(loop, queue, failure)

    @staticmethod
    def _deliver_many(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
        def put_all() -> None:
            for queue, item in items:
                queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the caller's event loop is closed: nobody listens
            pass

    @classmethod
    def _deliver(cls, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
        cls._deliver_many(loop, [(queue, item)])

    async def generate(self, request: Request) -> RequestStream:
        """Queue the request now; the returned iterator yields its outputs as they come."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
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
        return RequestStream(self, rid, queue)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wake.set()

    def fail_all(self, message: str, status: int = 503) -> int:
        """End every open request now with RequestFailed(message, status) (e.g. the shutdown
        grace period ran out): each stream raises it, and the engine frees their slots.
        Returns how many requests were ended."""
        streams = list(self._streams.items())
        failure = RequestFailed(message, status)
        for rid, (loop, queue) in streams:
            self.engine.abort_request(rid)
            self._deliver(loop, queue, failure)
        self._wake.set()
        return len(streams)

    async def shutdown(self) -> None:
        """Stop the loop thread (waited for off the event loop)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        self.engine.close()


class RequestStream:
    """The outputs of one request, as an async iterator (what `AsyncEngine.generate` returns).

    It ends after the finished output, or raises RequestFailed (after any outputs produced
    before the fault). Leaving early aborts the request: `aclose()`, or a cancellation while
    waiting. A class rather than an async generator, so that `aclose()` works at any moment —
    even while another task is waiting in `__anext__` or before iteration began (closing a
    running async generator raises, and closing an unstarted one skips its cleanup)."""

    def __init__(self, engine: AsyncEngine, rid: str, queue: asyncio.Queue) -> None:
        self.engine, self.rid, self.queue = engine, rid, queue
        self._closed = False
        self._error: BaseException | None = None  # raised by the next __anext__

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled while waiting: nobody listens any more
            self._close(abort=True)
            raise
        if isinstance(item, BaseException):  # the engine is gone, or fail_all
            self._close(abort=False)
            raise item
        if item.finished:
            self._close(abort=False)
        if item.error is not None:
            if not item.deltas:
                raise item.error
            self._error = item.error
        return item

    async def aclose(self) -> None:
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine._streams.pop(self.rid, None)
        if abort:
            self.engine.abort(self.rid)
