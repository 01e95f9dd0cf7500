"""Prefill time of an int4 export at accuracy level 4 against the same graph with its 4-bit
MatMulNBits nodes at level 0 (the 8-bit head stays at 4), per CPU-second, one thread.

    python scripts/prefill_level_ab.py EXPORT_DIR PROMPT_TOKENS

Writes EXPORT_DIR/model.prefill0.onnx (the level-0 twin), then prefills PROMPT_TOKENS tokens in
256-token chunks through OrtRunner with each graph, 3 interleaved repeats, medians.
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner


def write_twin(folder: Path) -> str:
    model = onnx.load(str(folder / "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and next(a.i for a in node.attribute if a.name == "bits") == 4:
            next(a for a in node.attribute if a.name == "accuracy_level").i = 0
    onnx.save(model, str(folder / "model.prefill0.onnx"))
    return "model.prefill0.onnx"


def main(folder: Path, length: int) -> None:
    runners = {
        "level 4": OrtRunner(folder, threads=1),
        "level 0": OrtRunner(folder, threads=1, model_file=write_twin(folder)),
    }
    prompt = np.random.default_rng(0).integers(100, 20000, length).tolist()
    seconds: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(3):
        for name, runner in runners.items():
            runner.allocate(1, length + 64)
            c0 = time.process_time()
            for s in range(0, length, 256):
                runner.forward([Chunk(0, prompt[s : s + 256], s, "last")])
            seconds[name].append(time.process_time() - c0)
    for name, v in seconds.items():
        print(f"{name}: prefill {statistics.median(v):.2f} CPU-s {[round(x, 2) for x in v]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
