"""Decode-step time of an exported model with the cache shared through IO binding (present
bound to the past buffers) against plain `session.run` (fresh present arrays every step).

    python scripts/bench_shared_cache.py EXPORT_DIR [--capacity 256 1024] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ragtop.export.verify import SharedCacheRunner


def spec_of(folder: Path):
    from ragtop.export.onnx import ExportSpec

    return ExportSpec(**json.loads((folder / "export_report.json").read_text())["spec"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--capacity", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    spec = spec_of(a.export_dir)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(str(a.export_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    print("| capacity | cache MB | shared buffers ms/step | copied ms/step |")
    print("|---|---|---|---|")
    for C in a.capacity:
        runner = SharedCacheRunner(sess, spec, 1, C)
        runner.step(np.arange(8)[None] % spec.vocab_size)  # an 8-token prompt
        shared = []
        for t in range(a.steps):
            t0 = time.perf_counter()
            runner.step(np.array([[t % spec.vocab_size]]))
            shared.append(time.perf_counter() - t0)
        feeds = {name.replace("present", "past_key_values"): None for name in spec.output_names()[1:]}
        for i in range(spec.n_layers):
            for kind in spec.cache_names:
                feeds[f"past_key_values.{i}.{kind}"] = runner.buffers[f"{i}.{kind}"].numpy().copy()
        lengths = runner.lengths.copy()
        copied = []
        for t in range(a.steps):
            t0 = time.perf_counter()
            outs = sess.run(
                None,
                {
                    "input_ids": np.array([[t % spec.vocab_size]]),
                    "past_lengths": lengths,
                    "logits_indices": np.zeros((1, 1), np.int64),
                    **feeds,
                },
            )
            for name, value in zip(spec.output_names()[1:], outs[1:], strict=True):
                feeds[name.replace("present", "past_key_values")] = value
            lengths = lengths + 1
            copied.append(time.perf_counter() - t0)
        mb = sum(b.numpy().nbytes for b in runner.buffers.values()) / 1e6
        print(f"| {C} | {mb:.1f} | {statistics.median(shared) * 1e3:.2f} | {statistics.median(copied) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
