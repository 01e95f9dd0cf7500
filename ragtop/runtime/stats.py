"""Plain stats dataclasses the engine emits every iteration; the server turns them into
Prometheus metrics (this module imports nothing from prometheus)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FinishedRequestStats:
    request_id: str
    finish_reason: str  # "stop" | "length" | "abort" | "error" (the first sequence's, for n > 1)
    prompt_tokens: int
    generation_tokens: int  # over all n sequences
    queue_time_s: float  # arrival -> admission
    time_to_first_token_s: float | None  # None when aborted before any token
    e2e_latency_s: float


@dataclass(frozen=True)
class IterationStats:
    """One engine step."""

    timestamp: float  # time.time() at the end of the step
    runner: str
    attention: str  # the model's attention mode: "dense" | "topk" | "topk-block"
    batch_size: int  # sequences computed this step
    num_running: int  # sequences holding a slot after the step
    num_waiting: int  # requests queued after the step
    prompt_tokens: int  # prefill tokens computed this step
    generation_tokens: int  # tokens sampled this step
    prefill_time_s: float
    decode_time_s: float
    sample_time_s: float
    context_lengths: list[int] = field(default_factory=list)  # cached tokens per decoding sequence
    kv_cache_bytes_used: int = 0
    kv_cache_bytes_total: int = 0
    kv_cache_usage_perc: float = 0.0  # fraction of cache tokens holding data (0..1)
    kv_cache_reserved_perc: float = 0.0  # fraction of slots (paged: pages) given to sequences (0..1)
    kv_cache_blocks_used: int = 0  # paged cache: pages referenced (running sequences + cached prefixes)
    kv_cache_blocks_free: int = 0  # paged cache: pages on the free list
    num_preemptions: int = 0  # requests preempted this step (paged cache out of pages; recompute)
    prefix_cache_queries: int = 0  # prompt tokens of the requests admitted this step (looked up)
    prefix_cache_hits: int = 0  # of those, tokens found in the prefix cache (not computed)
    time_to_first_tokens_s: list[float] = field(default_factory=list)  # requests whose first token came now
    inter_token_latencies_s: list[float] = field(default_factory=list)  # per sequence that decoded
    finished: list[FinishedRequestStats] = field(default_factory=list)
    spec_draft_tokens: int = 0  # self-speculative decoding: drafts verified this step
    spec_accepted_tokens: int = 0  # of those, drafts the dense pass agreed with
