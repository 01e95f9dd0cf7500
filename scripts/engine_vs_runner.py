"""In-process engine decode vs a bare runner loop on the same graph, one thread.

    python scripts/engine_vs_runner.py EXPORTED_MODEL_DIR PROMPT_TOKENS DECODE_STEPS

The bare loop calls OrtRunner.forward directly (IO binding of the shared cache, argmax in
numpy): nothing of the engine. The engine run is LLMEngine.step() with the same prompt,
greedy, no prefix caching (scheduler, numpy sampler, detokenizer, stats). Both time the decode
steps after the first token; 3 alternating repeats, medians.
"""

import statistics
import sys
import time

import numpy as np

from ragtop.runtime import EngineConfig, Request, SamplingParams, SchedulerConfig, load_model
from ragtop.runtime.runners.base import Chunk

path, prompt_len, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = load_model(path, threads=1)
rng = np.random.default_rng(0)
prompt = rng.integers(100, 20000, prompt_len).tolist()


def bare():
    r = m.runner
    r.allocate(1, prompt_len + n + 8)
    for s in range(0, prompt_len, 256):
        logits = r.forward([Chunk(0, prompt[s : s + 256], s, "last")])[0]
    tok = int(np.argmax(logits))
    pos = prompt_len
    t0 = time.perf_counter()
    for _ in range(n):
        logits = r.forward([Chunk(0, [tok], pos, "last")])[0]
        tok = int(np.argmax(logits))
        pos += 1
    return n / (time.perf_counter() - t0)


def engine():
    e = m.engine(
        EngineConfig(SchedulerConfig(max_batch_size=1), context_limit=prompt_len + n + 8, prefix_caching=False)
    )
    times = []
    e.stats_listeners.append(lambda s: times.append((s.decode_time_s, s.generation_tokens, s.prompt_tokens)))
    e.add_request(Request("a", prompt, SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)))
    t_first = None
    while e.has_work():
        outs = e.step()
        if t_first is None and any(o.deltas for o in outs):
            t_first = time.perf_counter()
    return n / (time.perf_counter() - t_first)


res = {"bare": [], "engine": []}
for _ in range(3):
    res["bare"].append(bare())
    res["engine"].append(engine())
b, eg = statistics.median(res["bare"]), statistics.median(res["engine"])
print(
    f"prompt {prompt_len}, {n} decode steps, 1 thread: bare runner loop {b:.2f} tok/s "
    f"{[round(x, 2) for x in res['bare']]}, "
    f"engine {eg:.2f} tok/s {[round(x, 2) for x in res['engine']]}, engine/bare {eg / b:.3f}"
)
