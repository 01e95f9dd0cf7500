"""The physical bound: memory read bandwidth, and the bytes one decoded token must read.

Probe: numpy sums over a large float32 array (well beyond the caches), single-threaded and
split over `threads` threads (numpy releases the GIL inside the reduction); best of
`repeats`. A decode step of one sequence must at least read the weights and the part of the
KV cache (and selector summaries) its attention touches, so

    bound tokens/s = read bandwidth / bytes per token,   % of bound = measured / bound.

Bytes per decoded token, batch 1, context L, n layers, s = Hkv * Dh * bytes per key (or value)
row of one layer (docs/benchmarks.md and /work/shared/notes/sparse-attention.md):

- weights: every parameter once (the tied head reads the whole embedding table; an untied
  model's input embedding reads one row);
- dense:        n * L * 2s
- top-k exact:  n * (L * s + min(k, L) * s)          every key scored, k values read
- top-k block:  n * (2 * ceil(L/bs) * s              per-block min and max summaries
                     + min(L, (budget+1)*bs) * s     keys of the own + `budget` chosen blocks
                     + min(k, L, (budget+1)*bs) * s) values of the k best of them
- fallback (standard-op body, no plugin): n * C * 2s, C = the cache capacity (it scores
  every slot); an approximation, the body also materialises scores.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def probe(size_mb: int = 1024, threads: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Read (sum) and copy bandwidth of a `size_mb` MiB float32 array, in GB/s (1e9 B/s)."""
    n = size_mb * 2**20 // 4
    a = np.ones(n, dtype=np.float32)  # touched: every page is resident
    b = np.empty_like(a)
    nbytes = a.nbytes

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    read_1 = nbytes / best(lambda: a.sum()) / 1e9
    parts = np.array_split(a, max(1, threads))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        read_n = nbytes / best(lambda: list(pool.map(np.sum, parts))) / 1e9
    copy = 2 * nbytes / best(lambda: np.copyto(b, a)) / 1e9  # read + write
    return {
        "array_mib": size_mb,
        "threads": threads,
        "repeats": repeats,
        "read_gbps_1_thread": read_1,
        "read_gbps_threads": read_n,
        "copy_gbps": copy,
        "read_gbps": max(read_1, read_n),
        "method": "numpy float32 sum (read) and copyto (read+write), best of repeats",
    }


def safetensors_bytes(path: Path) -> dict[str, int]:
    """name -> byte size of every tensor in a .safetensors file (from its header only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def model_facts(checkpoint: Path) -> dict[str, Any]:
    """What the byte model needs from a checkpoint folder (config.json + model.safetensors)."""
    cfg = json.loads((checkpoint / "config.json").read_text())["model"]
    sizes = safetensors_bytes(checkpoint / "model.safetensors")
    total = sum(sizes.values())
    embed = next((v for k, v in sizes.items() if k.startswith("embed") and k.endswith("weight")), 0)
    read = total
    if not cfg.get("tie_embeddings", True) and embed:
        read = total - embed + embed // cfg["vocab_size"]  # one row of the input table
    bytes_per = 4  # fp32 exports and cache
    att = cfg.get("attention") or {}
    return {
        "n_layers": cfg["n_layers"],
        "n_kv_heads": cfg["n_kv_heads"],
        "head_dim": cfg["head_dim"],
        "weight_bytes": total,
        "weight_bytes_read": read,
        "dtype_bytes": bytes_per,
        "kv_row_bytes": cfg["n_kv_heads"] * cfg["head_dim"] * bytes_per,
        "kv_bytes_per_token": 2 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * bytes_per,
        "attention": att.get("kind", "dense"),
        "max_seq_len": cfg.get("max_seq_len"),
    }


def with_bytes(facts: dict[str, Any], weight_bytes_read: int | None, kv_dtype_bytes: int | None) -> dict[str, Any]:
    """`facts` with another system's weight bytes per token (quantized weights) and KV dtype."""
    out = dict(facts)
    if weight_bytes_read:
        out["weight_bytes_read"] = int(weight_bytes_read)
    if kv_dtype_bytes:
        row = facts["n_kv_heads"] * facts["head_dim"] * kv_dtype_bytes
        out.update(dtype_bytes=kv_dtype_bytes, kv_row_bytes=row, kv_bytes_per_token=2 * facts["n_layers"] * row)
    return out


ONNX_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 1, 22: 1}
GATHERS = {
    "Gather": (0,),
    "GatherND": (0,),
    "GatherBlockQuantized": (0, 2, 3),
}  # inputs of which a lookup reads one row


def onnx_weight_bytes(model_path: Path) -> int:
    """Bytes of the initializers one decode step reads: all of them, except a table that only a
    Gather / GatherBlockQuantized looks up (one row of it, with its scales), as an embedding."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    uses: dict[str, set[bool]] = {}
    for node in m.graph.node:
        rows_only = GATHERS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            uses.setdefault(name, set()).add(i in rows_only)
    total = 0
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            n = int(ext["length"])
        elif t.raw_data:
            n = len(t.raw_data)
        else:
            n = math.prod(t.dims) * ONNX_ELEM_BYTES.get(t.data_type, 4)
        if uses.get(t.name) == {True} and t.dims and t.dims[0] > 0:
            n //= t.dims[0]
        total += n
    return total


def onnx_kv_dtype_bytes(model_path: Path) -> int | None:
    """Bytes per element of a graph's KV-cache inputs (past_key_values.*), None if it has none."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    for inp in m.graph.input:
        if "past_key" in inp.name:
            return ONNX_ELEM_BYTES.get(inp.type.tensor_type.elem_type)
    return None


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors one decode step reads (llama.cpp): a tied token_embd serves as
    the head and is read whole; with a separate output.weight the input table reads one row."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    total = 0
    for t in tensors:
        n = int(t.n_bytes)
        if untied and t.name == "token_embd.weight":
            n //= max(1, int(t.n_elements) // int(t.shape[0]))
        total += n
    return total


def bytes_per_token(
    facts: dict[str, Any],
    mode: str,
    context: int,
    topk: int | None = None,
    block_size: int | None = None,
    block_budget: int | None = None,
    capacity: int | None = None,
) -> dict[str, int]:
    """Bytes one decoded token reads (batch 1) at `context` tokens, split by where they come from."""
    n, s, L = facts["n_layers"], facts["kv_row_bytes"], context
    selector = 0
    if mode == "dense":
        kv = n * L * 2 * s
    elif mode == "topk":
        kv = n * (L * s + min(topk or L, L) * s)
    elif mode == "topk-block":
        if not (block_size and block_budget):
            raise ValueError("topk-block needs block_size and block_budget")
        chosen = min(L, (block_budget + 1) * block_size)
        selector = n * 2 * math.ceil(L / block_size) * s
        kv = n * (chosen * s + min(topk or chosen, chosen) * s)
    elif mode == "fallback":
        kv = n * (capacity or L) * 2 * s
    else:
        raise ValueError(f"unknown mode {mode!r}")
    w = facts["weight_bytes_read"]
    return {"weights": w, "kv": kv, "selector": selector, "total": w + kv + selector}


def add_arguments(sub) -> None:
    p = sub.add_parser("bandwidth", help="the memory-bandwidth probe alone")
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    r = probe(a.size_mb, a.threads, a.repeats)
    print(
        f"read {r['read_gbps_1_thread']:.2f} GB/s (1 thread), {r['read_gbps_threads']:.2f} GB/s "
        f"({r['threads']} threads); copy {r['copy_gbps']:.2f} GB/s"
    )
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    return 0
