"""A dense prefill with each plugin library given, one thread, each in its own process,
alternating (A B A B ...): CPU seconds for the prompt in 256-token chunks, the greedy token
after it (the libraries should agree), and the best of 8 dense 5-token passes after it.

    python scripts/prefill_plugin_ab.py EXPORT_DIR TOKENS A.so B.so [--rounds 2]

EXPORT_DIR: an export with the attention_dense input (the served model's folder); the prompt
is random token ids.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def one(export: Path, n: int, lib: Path) -> None:
    import ragtop.runtime.plugin as plugin

    plugin.plugin_library_path = lambda: lib  # this process registers `lib`
    from ragtop.runtime.runners.base import Chunk
    from ragtop.runtime.runners.onnxruntime import OrtRunner

    r = OrtRunner(export, 1)
    ids = np.random.default_rng(0).integers(100, 20000, n + 8).tolist()
    r.allocate(1, n + 64)
    t = time.process_time()
    for s in range(0, n, 256):
        (logits,) = r.forward([Chunk(0, ids[s : min(n, s + 256)], s, "last", dense=True)])
    prefill = time.process_time() - t
    best = float("inf")
    for _ in range(8):
        t = time.process_time()
        r.forward([Chunk(0, ids[n : n + 5], n, "last", dense=True)])
        r.rollback(0, n, n)
        best = min(best, time.process_time() - t)
    token = int(np.argmax(logits))
    print(f"{lib}: prefill {prefill:.1f} s CPU, next token {token}, 5-token dense pass {best * 1e3:.1f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("tokens", type=int)
    p.add_argument("libs", type=Path, nargs="+")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one library
    a = p.parse_args()
    if a.one:
        return one(a.export, a.tokens, a.libs[0])
    for _ in range(a.rounds):
        for lib in a.libs:
            subprocess.run([sys.executable, __file__, str(a.export), str(a.tokens), str(lib), "--one"], check=True)


if __name__ == "__main__":
    main()
