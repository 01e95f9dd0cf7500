"""One SmolLM2 MatMulNBits node (layer 0's stacked gate/up, the GGUF's own Q4_1 blocks) at
accuracy levels 0 and 4, timed per CPU-second for M = 1 .. 256 input rows (one thread).

    python scripts/matmulnbits_rows.py CHECKPOINT   # e.g. data/models/smollm2-top256

Decode runs M = 1, a speculative verification M = gamma + 1, prefill M = the chunk length:
which accuracy level is faster depends on M (docs/export.md, "The lean graph").
"""

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ragtop.checkpoint import load_checkpoint
from ragtop.export import weights as qweights
from ragtop.quant import concat_rows, load_file_blocks


def session(qb, K: int, N: int, level: int) -> ort.InferenceSession:
    inits = [
        numpy_helper.from_array(qb.packed_codes(), "B"),
        numpy_helper.from_array(qb.scales.astype(np.float32), "S"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "S"],
        ["Y"],
        domain="com.microsoft",
        K=K,
        N=N,
        bits=qb.bits,
        block_size=32,
        accuracy_level=level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(path: str) -> None:
    ckpt = load_checkpoint(path)
    planned = qweights.plan(ckpt.model, "int4", load_file_blocks(ckpt.path))
    qb = concat_rows([planned[f"layers.0.mlp.{n}.weight"].blocks for n in ("gate_proj", "up_proj")])
    K, N = ckpt.model.config.d_model, qb.codes.shape[0]
    for level in (0, 4):
        s, cells = session(qb, K, N, level), []
        for M in (1, 2, 5, 16, 64, 256):
            x = np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)
            for _ in range(3):
                s.run(None, {"A": x})
            reps = max(5, 200 // M)
            c0 = time.process_time()
            for _ in range(reps):
                s.run(None, {"A": x})
            dt = (time.process_time() - c0) / reps * 1e3
            cells.append(f"M={M}: {dt:.3f} ms ({dt / M:.3f}/row)")
        print(f"accuracy level {level}, K={K} N={N}: " + "; ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1])
