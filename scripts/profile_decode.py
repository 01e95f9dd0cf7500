"""Where a decode step's time goes, by operator type (onnxruntime's profiler), on one export
at a prefilled context: a dense step, a sparse step and a 5-token dense pass (a verification
of 4 drafts), 10 of each, one thread.

    python scripts/profile_decode.py EXPORT_DIR CONTEXT

EXPORT_DIR: an export with the attention_dense input (the served model's folder). The prompt
is random token ids, prefilled densely in 256-token chunks. Prints each kind's mean
model_run time and its four most expensive operator types (ms per step).
"""

import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner


def main() -> None:
    folder, n = Path(sys.argv[1]), int(sys.argv[2])
    make_options = ort.SessionOptions

    def profiled() -> ort.SessionOptions:
        so = make_options()
        so.enable_profiling = True
        so.profile_file_prefix = "/tmp/ragtop-profile"
        return so

    ort.SessionOptions = profiled  # the runner builds its session options through this name
    try:
        r = OrtRunner(folder, 1)
    finally:
        ort.SessionOptions = make_options
    ids = np.random.default_rng(0).integers(100, 20000, n + 8).tolist()
    r.allocate(1, n + 64)
    for s in range(0, n, 256):
        r.forward([Chunk(0, ids[s : min(n, s + 256)], s, "last", dense=True)])
    kinds = [("dense step", 1, True), ("sparse step", 1, False), ("dense 5-token pass", 5, True)]
    for _label, S, dense in kinds:
        for _ in range(10):
            r.forward([Chunk(0, ids[n : n + S], n, "last", dense=dense)])
            r.rollback(0, n, n)
    events = json.loads(Path(r.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-30:]
    for i, (label, _, _) in enumerate(kinds):
        group = runs[10 * i : 10 * i + 10]
        t0, t1 = group[0]["ts"], group[-1]["ts"] + group[-1]["dur"]
        ops: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and t0 <= e["ts"] <= t1:
                ops[e["args"]["op_name"]] += e["dur"]
        top = ", ".join(f"{k} {v / 10 / 1e3:.2f}" for k, v in ops.most_common(4))
        print(f"{label}: {sum(g['dur'] for g in group) / 10 / 1e3:.2f} ms; {top}", flush=True)


if __name__ == "__main__":
    main()
