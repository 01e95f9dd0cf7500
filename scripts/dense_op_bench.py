"""The dense-flagged ragtop::TopKAttention (a speculative verification pass) at an 8k float16
cache, SmolLM2's shape: CPU milliseconds per call for 1 and 5 query rows, one thread, for each
plugin library given (e.g. two builds of the kernel, interleaved).

    python scripts/dense_op_bench.py ragtop/_native/libragtop_ort.so [OTHER.so ...]
"""

import sys
import time

import numpy as np
import onnxruntime as ort

from ragtop.bench.graphs import topk_attention_model

plugins = sys.argv[1:]
H, Hkv, Dh, C, L = 9, 3, 64, 8256, 8000
m = topk_attention_model(H, Hkv, Dh, 3264, 64, 50, 64, 256, attention_dense=True, kv_dtype="fp16")
rng = np.random.default_rng(0)
pk = rng.standard_normal((1, Hkv, C, Dh)).astype(np.float16)
pv = rng.standard_normal((1, Hkv, C, Dh)).astype(np.float16)
kmin = np.full((1, Hkv, C // 64, Dh), -3, np.float32)
kmax = -kmin
sess = []
for p in plugins:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(p)
    sess.append(ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]))
names = [i.name for i in sess[0].get_inputs()]


def feeds(S):
    f = {
        "query": rng.standard_normal((1, S, H * Dh)).astype(np.float32),
        "key": rng.standard_normal((1, S, Hkv * Dh)).astype(np.float32),
        "value": rng.standard_normal((1, S, Hkv * Dh)).astype(np.float32),
        "past_key": pk,
        "past_value": pv,
        "past_lengths": np.array([L], np.int64),
        "past_key_min": kmin,
        "past_key_max": kmax,
        "attention_dense": np.array([1], np.int64),
    }
    return {k: v for k, v in f.items() if k in names}


for S in (1, 5):
    f = feeds(S)
    for _round in range(2):
        for p, s in zip(plugins, sess, strict=True):
            s.run(None, f)
            t = time.process_time()
            for _ in range(20):
                s.run(None, f)
            print(f"S={S} {p}: {(time.process_time() - t) / 20 * 1e3:.2f} ms CPU", flush=True)
