"""One ragtop::TopKAttention call at an 8k float16 cache, SmolLM2's shape (9 heads, 3 KV heads,
head size 64), bound in place as the runner binds it (past_* and present_* the same buffers):
CPU milliseconds per call, one thread, for each plugin library given (e.g. two builds of the
kernel, interleaved).

- dense S=1 / S=5: the dense-flagged op (a dense decode step / a 5-row verification);
- blocks S=1: the served default's block selection (64-token blocks, budget 20, 64 sink
  tokens, a 256-token window), a sparse decode step;
- dense export S=1: the op of a dense export (top-k = the cache capacity, no flag), a dense
  decode step as the dense baseline of `loadtests speculative` runs it.

    python scripts/dense_op_bench.py ragtop/_native/libragtop_ort.so [OTHER.so ...]
"""

import sys
import time

import numpy as np
import onnxruntime as ort

from ragtop.bench.graphs import topk_attention_model

plugins = sys.argv[1:]
H, Hkv, Dh, C, L, BS = 9, 3, 64, 8256, 8000, 64
models = {
    "blocks": topk_attention_model(H, Hkv, Dh, 3264, BS, 20, 64, 256, attention_dense=True, kv_dtype="fp16"),
    "dense export": topk_attention_model(H, Hkv, Dh, C, kv_dtype="fp16"),
}
rng = np.random.default_rng(0)
cache = {
    "key": rng.standard_normal((1, Hkv, C, Dh)).astype(np.float16),
    "value": rng.standard_normal((1, Hkv, C, Dh)).astype(np.float16),
}
blocks = cache["key"].astype(np.float32).reshape(1, Hkv, C // BS, BS, Dh)
cache["key_min"], cache["key_max"] = blocks.min(axis=3), blocks.max(axis=3)  # true bounds of the keys


def session(plugin: str, model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(plugin)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def binding(s: ort.InferenceSession, S: int, dense: bool):
    io = s.io_binding()
    for name, a in {
        "query": rng.standard_normal((1, S, H * Dh)).astype(np.float32),
        "key": rng.standard_normal((1, S, Hkv * Dh)).astype(np.float32),
        "value": rng.standard_normal((1, S, Hkv * Dh)).astype(np.float32),
        "past_lengths": np.array([L], np.int64),
    }.items():
        io.bind_cpu_input(name, a)
    names = {i.name for i in s.get_inputs()}
    if "attention_dense" in names:
        io.bind_ortvalue_input("attention_dense", ort.OrtValue.ortvalue_from_numpy(np.array([int(dense)], np.int64)))
    for kind, buf in cache.items():  # in place, as the runner binds the cache
        if f"past_{kind}" not in names:
            continue
        io.bind_input(f"past_{kind}", "cpu", 0, buf.dtype.type, list(buf.shape), buf.ctypes.data)
        io.bind_output(f"present_{kind}", "cpu", 0, buf.dtype.type, list(buf.shape), buf.ctypes.data)
    io.bind_output("output", "cpu")
    return io


sessions = {graph: [session(p, m) for p in plugins] for graph, m in models.items()}
cases = (("dense S=1", "blocks", 1, True), ("dense S=5", "blocks", 5, True), ("blocks S=1", "blocks", 1, False))
for label, graph, S, dense in (*cases, ("dense export S=1", "dense export", 1, False)):
    ios = [binding(s, S, dense) for s in sessions[graph]]
    for _round in range(2):
        for p, s, io in zip(plugins, sessions[graph], ios, strict=True):
            s.run_with_iobinding(io)
            t = time.process_time()
            for _ in range(50):
                s.run_with_iobinding(io)
            print(f"{label} {p}: {(time.process_time() - t) / 50 * 1e3:.3f} ms CPU", flush=True)
