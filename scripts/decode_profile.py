"""Where a decode step's time goes, by operator: onnxruntime's profiler over a bare
OrtRunner loop (one thread, the plugin loaded).

    python scripts/decode_profile.py EXPORT_DIR PROMPT_TOKENS DECODE_STEPS

Prefills PROMPT_TOKENS random token ids in 256-token chunks, then times DECODE_STEPS greedy
steps with profiling on, and prints each operator type's share of the decode steps' node
time. (The profiler's own overhead inflates absolute times: read the shares.)
"""

import collections
import json
import sys
import tempfile

import numpy as np
import onnxruntime as ort

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner


def main(folder: str, length: int, steps: int) -> None:
    prefix = tempfile.mkdtemp() + "/profile"

    class Profiled(ort.SessionOptions):
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling, self.profile_file_prefix = True, prefix

    ort.SessionOptions = Profiled  # OrtRunner builds its session options from this name
    runner = OrtRunner(folder, threads=1)
    prompt = np.random.default_rng(0).integers(100, 20000, length).tolist()
    runner.allocate(1, length + steps + 64)
    for s in range(0, length, 256):
        logits = runner.forward([Chunk(0, prompt[s : s + 256], s, "last")])[0]
    token, pos = int(np.argmax(logits)), length
    for _ in range(steps):
        logits = runner.forward([Chunk(0, [token], pos, "last")])[0]
        token, pos = int(np.argmax(logits)), pos + 1
    events = json.load(open(runner.session.end_profiling()))
    start = [e for e in events if e.get("name") == "model_run"][-steps]["ts"]
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    print(f"{folder}: {length}-token prompt, {steps} decode steps; node time per step {total / steps / 1000:.2f} ms")
    for op, us in by_op.most_common():
        print(f"  {op:28s} {100 * us / total:5.1f} %")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
