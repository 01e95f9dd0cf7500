"""Every Prometheus object of the server, on one explicit registry.

The engine emits plain `IterationStats` each step (from its own thread); `observe` turns them
into metrics. Names follow vLLM's under the `ragtop:` prefix, plus ragtop's own: resident
memory and KV-cache bytes, and long-context throughput — decode tokens and decode seconds
labelled by context-length bucket and attention mode, so that

    rate(ragtop:decode_tokens_total[1m]) / rate(ragtop:decode_seconds_total[1m])

is the decode tokens/s per bucket. A step decodes a batch of sequences in one forward pass;
each decoded token is charged `decode_time / batch` seconds, so the ratio is the aggregate
decode throughput of the batches that bucket's tokens ran in.
"""

from __future__ import annotations

import resource
from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..runtime import IterationStats

# Context-length buckets of the long-context throughput counters: (upper bound, label).
CONTEXT_BUCKETS: tuple[tuple[float, str], ...] = (
    (1024, "0-1k"),
    (4096, "1k-4k"),
    (16384, "4k-16k"),
    (float("inf"), "16k+"),
)
ATTENTION_MODES = ("dense", "topk", "topk-block")
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's latency buckets, plus the bounds operators alert on (e.g. 2 s TTFT).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def context_bucket(tokens: int) -> str:
    return CONTEXT_BUCKETS[bisect_left([b for b, _ in CONTEXT_BUCKETS], tokens)][1]


def resident_memory_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0


def peak_resident_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # no `_created` series next to every counter (as vLLM)
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"ragtop:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"ragtop:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"ragtop:{name}", doc, labels, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a sequence.", ITL_BUCKETS)
        self.tpot = hist(
            "time_per_output_token_seconds", "(e2e - ttft) / (generated tokens - 1) per request.", ITL_BUCKETS
        )
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Time a request waited before admission.", TTFT_BUCKETS)
        self.req_prompt = hist("request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_BUCKETS)
        self.req_gen = hist("request_generation_tokens", "Generated tokens per finished request.", TOKEN_BUCKETS)
        self.running = gauge("num_requests_running", "Sequences holding a KV-cache slot.")
        self.waiting = gauge("num_requests_waiting", "Requests queued for admission.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache tokens holding data (0..1).")
        self.kv_reserved = gauge("kv_cache_reserved_perc", "Fraction of KV-cache slots given to sequences (0..1).")
        self.kv_used = gauge("kv_cache_used_bytes", "KV-cache bytes holding data.")
        self.kv_total = gauge("kv_cache_total_bytes", "KV-cache bytes preallocated.")
        self.kv_blocks_used = gauge("kv_cache_blocks_used", "Paged KV cache: pages in block tables (0: contiguous).")
        self.kv_blocks_free = gauge("kv_cache_blocks_free", "Paged KV cache: pages free (0: contiguous).")
        self.preemptions = counter(
            "num_preemptions_total", "Requests preempted (recomputed) for lack of KV-cache pages."
        )
        self.rss = gauge("resident_memory_bytes", "Resident memory of the server process.")
        self.peak_rss = gauge("peak_resident_memory_bytes", "Peak resident memory of the server process.")
        self.rss.set_function(resident_memory_bytes)
        self.peak_rss.set_function(peak_resident_memory_bytes)
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens computed (prefill).")
        self.gen_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not computed).")
        # vLLM's speculative-decoding names; acceptance rate = accepted / draft
        self.spec_draft = counter(
            "spec_decode_num_draft_tokens_total",
            "Self-speculative decoding: tokens drafted by the sparse model and verified densely.",
        )
        self.spec_accepted = counter(
            "spec_decode_num_accepted_tokens_total",
            "Self-speculative decoding: drafted tokens the dense verification accepted.",
        )
        success = Counter(
            "ragtop:request_success_total",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        dtok = Counter(
            "ragtop:decode_tokens_total",
            "Decoded tokens by context-length bucket and attention mode.",
            ["model_name", "context_bucket", "attention"],
            registry=r,
        )
        dsec = Counter(
            "ragtop:decode_seconds_total",
            "Decode seconds charged to those tokens (step time / batch).",
            ["model_name", "context_bucket", "attention"],
            registry=r,
        )
        self.decode_tokens = {
            (b, a): dtok.labels(model_name, b, a) for _, b in CONTEXT_BUCKETS for a in ATTENTION_MODES
        }
        self.decode_seconds = {
            (b, a): dsec.labels(model_name, b, a) for _, b in CONTEXT_BUCKETS for a in ATTENTION_MODES
        }
        self.http_errors = Counter(
            "ragtop:http_errors_total", "Refused requests by HTTP status.", ["model_name", "status"], registry=r
        )

    def observe(self, s: IterationStats) -> None:
        """One engine step (called from the engine thread; prometheus_client is thread-safe)."""
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage_perc)
        self.kv_reserved.set(s.kv_cache_reserved_perc)
        self.kv_used.set(s.kv_cache_bytes_used)
        self.kv_total.set(s.kv_cache_bytes_total)
        self.kv_blocks_used.set(s.kv_cache_blocks_used)
        self.kv_blocks_free.set(s.kv_cache_blocks_free)
        self.preemptions.inc(s.num_preemptions)
        self.prompt_tokens.inc(s.prompt_tokens)
        self.gen_tokens.inc(s.generation_tokens)
        self.prefix_queries.inc(s.prefix_cache_queries)
        self.prefix_hits.inc(s.prefix_cache_hits)
        self.spec_draft.inc(s.spec_draft_tokens)
        self.spec_accepted.inc(s.spec_accepted_tokens)
        for t in s.time_to_first_tokens_s:
            self.ttft.observe(t)
        for t in s.inter_token_latencies_s:
            self.itl.observe(t)
        if s.context_lengths:
            mode = s.attention if s.attention in ATTENTION_MODES else "dense"
            share = s.decode_time_s / len(s.context_lengths)
            for n in s.context_lengths:
                key = (context_bucket(n), mode)
                self.decode_tokens[key].inc()
                self.decode_seconds[key].inc(share)
        for f in s.finished:
            self.success.get(f.finish_reason, self.success["abort"]).inc()
            self.e2e.observe(f.e2e_latency_s)
            self.queue.observe(f.queue_time_s)
            self.req_prompt.observe(f.prompt_tokens)
            self.req_gen.observe(f.generation_tokens)
            if f.time_to_first_token_s is not None and f.generation_tokens > 1:
                self.tpot.observe((f.e2e_latency_s - f.time_to_first_token_s) / (f.generation_tokens - 1))

    def refused(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
