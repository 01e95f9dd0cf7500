"""One TopKAttention layer (the plugin kernel) with a float32 vs a float16 KV cache, one thread,
interleaved, in CPU milliseconds per call (`time.process_time`: a loaded machine's other jobs
disturb it far less than wall time).

    python scripts/kv16_kernel_ab.py [REPEATS]

SmolLM2's attention shape (9 query heads, 3 KV heads, head dim 64); decode (one query) at
cache lengths 1k / 4k / 8k / 32k, exact top-256 and the served block selection (blocks of
32, budget 32, topk 1056, 32 sinks, window 256); each call runs on the next of several cache
copies (>= 96 MiB in all, as ragtop bench ops does) so keys come from memory. Medians of
REPEATS rounds (default 5), each round timing fp32 then fp16 for 200 calls.
"""

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

from ragtop.bench.graphs import topk_attention_model
from ragtop.bench.ops import LLC_SPAN, _Runner, _summaries

H, HKV, DH = 9, 3, 64
MODES = {  # name: (topk, block_size, block_budget, sink, window)
    "exact-256": (256, 0, 0, 0, 0),
    "block-32x32": (1056, 32, 32, 32, 256),
}


def runner(kv: str, mode: str, length: int, rng) -> _Runner:
    topk, bs, budget, sink, window = MODES[mode]
    C = -(-length // 32) * 32
    q = rng.standard_normal((1, 1, H * DH), dtype=np.float32)
    k = rng.standard_normal((1, 1, HKV * DH), dtype=np.float32)
    keys = rng.standard_normal((1, HKV, C, DH), dtype=np.float32)
    vals = rng.standard_normal((1, HKV, C, DH), dtype=np.float32)
    dt = np.float16 if kv == "fp16" else np.float32
    shared = {"past_key": keys.astype(dt), "past_value": vals.astype(dt)}
    if bs:
        lo, hi = _summaries(keys.astype(dt).astype(np.float32), length - 1, bs)
        shared.update(past_key_min=lo, past_key_max=hi)
    sets = min(32, max(2, -(-LLC_SPAN // (2 * keys.nbytes))))  # the same count for both dtypes
    model = topk_attention_model(H, HKV, DH, topk, bs, budget, sink, window, kv_dtype=kv)
    feeds = {"query": q, "key": k, "value": k.copy(), "past_lengths": np.array([length - 1], np.int64)}
    return _Runner(ort, model, 1, True, feeds, shared, sets)


def cpu_ms(r: _Runner, calls: int = 200) -> float:
    for _ in range(5):
        r()
    c0 = time.process_time()
    for _ in range(calls):
        r()
    return (time.process_time() - c0) / calls * 1e3


def main(argv: list[str]) -> None:
    repeats = int(argv[0]) if argv else 5
    rng = np.random.default_rng(0)
    for mode in MODES:
        for length in (1024, 4096, 8192, 32768):
            rs = {kv: runner(kv, mode, length, rng) for kv in ("fp32", "fp16")}
            ms: dict[str, list[float]] = {kv: [] for kv in rs}
            for _ in range(repeats):
                for kv, r in rs.items():
                    ms[kv].append(cpu_ms(r))
            a, b = statistics.median(ms["fp32"]), statistics.median(ms["fp16"])
            print(f"{mode:12s} decode at {length:6d}: fp32 {a:.4f} ms, fp16 {b:.4f} ms (fp16 {a / b:.2f}x as fast)")


if __name__ == "__main__":
    main(sys.argv[1:])
