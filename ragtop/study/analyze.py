"""Attention cost: the summary's claims, an honest accounting, and measurements.

Accounting, per layer, width d = H x Dh, fp32 (4 bytes), prefill of T tokens:

- dense:        scores 2·T²·d (every q·k pair, as the summary counts them: the full square)
                + weighted values 2·T²·d.
- exact top-k:  the same 2·T²·d scores (a key must be scored to be ranked), the selection
                (~T²·H comparisons), then 2·T·k·d for the k kept values. At most ~2x fewer
                FLOPs than dense, whatever T.
- block top-k:  summaries (2·T·d min/max), the selector's bounds 4·T·(T/b)·d, scores of
                the candidate blocks 2·T·(n+1)·b·d, values 2·T·k·d.
- "k keys only": 4·T·k·d, the figure one gets by forgetting scoring and selection.

Decode (one new token, context L) bytes read per layer: dense 2·L·d·4; exact top-k
(L + k)·d·4; block (2·L/b + (n+1)·b + k)·d·4. Attention memory at prefill: a naive kernel
materialises T²·H fp32 scores; torch's SDPA and ragtop's chunked top-k never do.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .kernels import block_summaries, block_topk_decode, dense_decode, topk_decode

BYTES = 4
HEAD_DIM = 64  # heads = d / 64 for measurements (the summary's memory figures imply d / 8)
TOPK, BLOCK, BUDGET = 32, 32, 7  # k kept keys; blocks of 32 keys, 7 + own kept (256 candidates)

# The research summary's numbers, as printed there (what this command checks).
CLAIMED_FLOPS = [  # (d, T, dense, sparse)
    (128, 64, 1.0e6, 5.8e6),
    (512, 256, 67.1e6, 29.4e6),
    (1024, 1024, 2147.5e6, 218.1e6),
]
CLAIMED_SPEEDUP_8K = 500.0
CLAIMED_MEMORY = [  # (d, T, dense bytes, sparse bytes)
    (512, 512, 67.1e6, 4.2e6),
    (1024, 1024, 536.9e6, 16.8e6),
    (2048, 2048, 4295e6, 67.1e6),
]


def prefill_flops(T: int, d: int, k: int = TOPK, b: int = BLOCK, n: int = BUDGET, dh: int = HEAD_DIM) -> dict:
    H = max(d // dh, 1)
    scores = 2 * T * T * d
    kk = min(k, T)
    cand = min((n + 1) * b, T)
    return {
        "dense_scores": scores,
        "dense": scores + 2 * T * T * d,
        "topk_exact": scores + T * T * H + 2 * T * kk * d,
        "topk_block": 2 * T * d + 4 * T * math.ceil(T / b) * d + 2 * T * cand * d + T * cand * H + 2 * T * kk * d,
        "k_keys_only": 4 * T * kk * d,
    }


def decode_bytes(L: int, d: int, k: int = TOPK, b: int = BLOCK, n: int = BUDGET) -> dict:
    cand = min((n + 1) * b, L)
    return {
        "dense": 2 * L * d * BYTES,
        "topk_exact": (L + min(k, L)) * d * BYTES,
        "topk_block": (2 * math.ceil(L / b) + cand + min(k, L)) * d * BYTES,
    }


def prefill_memory(T: int, d: int, k: int = TOPK, heads: int | None = None, q_chunk: int = 128) -> dict:
    """Bytes of attention intermediates (scores) alive at once, per layer."""
    H = heads or max(d // HEAD_DIM, 1)
    return {
        "naive_dense": T * T * H * BYTES,
        "sdpa_flash": 0,
        "topk_chunked": min(q_chunk, T) * T * H * BYTES,
        "k_scores_only": T * min(k, T) * H * BYTES,
        "kv": 2 * T * d * BYTES,
    }


def check_claims() -> dict:
    """Which formulas reproduce the summary's numbers."""
    flops = []
    for d, T, dense, sparse in CLAIMED_FLOPS:
        f = prefill_flops(T, d)
        flops.append(
            {
                "d": d,
                "T": T,
                "claimed_dense": dense,
                "claimed_sparse": sparse,
                "claimed_ratio": dense / sparse,
                "2T2d": f["dense_scores"],
                **f,
                "ratio_dense_vs_topk_exact": f["dense"] / f["topk_exact"],
                "ratio_dense_vs_topk_block": f["dense"] / f["topk_block"],
            }
        )
    memory = []
    for d, T, dense, sparse in CLAIMED_MEMORY:
        m = prefill_memory(T, d, k=32, heads=d // 8)  # the head count that reproduces the claim
        memory.append(
            {
                "d": d,
                "T": T,
                "claimed_dense": dense,
                "claimed_sparse": sparse,
                "T2_H_4_with_H_d_over_8": m["naive_dense"],
                "T_k_H_4_with_k32": m["k_scores_only"],
                "topk_chunked_computes": m["topk_chunked"],
                "kv_cache": m["kv"],
            }
        )
    f8 = prefill_flops(8192, 1024)
    return {
        "flops": flops,
        "memory": memory,
        "speedup_8k": {
            "claimed": CLAIMED_SPEEDUP_8K,
            "dense_over_topk_exact": f8["dense"] / f8["topk_exact"],
            "dense_over_topk_block": f8["dense"] / f8["topk_block"],
            "dense_over_k_keys_only": f8["dense"] / f8["k_keys_only"],
            "decode_bytes_dense_over_block": (lambda b: b["dense"] / b["topk_block"])(decode_bytes(8192, 1024)),
        },
    }


# -- measurements ---------------------------------------------------------------------
def _cpu_time(fn, repeats: int) -> float:
    """Fastest of `repeats` calls, in CPU seconds of this (single torch) thread.

    CPU time, not wall time: on a shared machine a niced process is preempted for whole
    scheduler slices, which wall-clock medians of millisecond calls absorb at random.
    Memory stalls still count (the thread is running while it waits on DRAM).
    """
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        ts.append(time.thread_time() - t)
    return min(ts)


def _prefill_impls(T: int, d: int):
    from ..model import AttentionConfig, ModelConfig
    from ..model.attention import AttnContext, TopKAttention

    H = max(d // HEAD_DIM, 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, HEAD_DIM, generator=g) for _ in range(3))
    ar = torch.arange(T)
    ctx = AttnContext(None, None, ar[None], (ar[None, :] <= ar[:, None])[None, None], None, True)
    cfg = ModelConfig(
        vocab_size=8,
        d_model=H * HEAD_DIM,
        n_layers=1,
        n_heads=H,
        n_kv_heads=H,
        d_ff=8,
        max_seq_len=T,
        attention=AttentionConfig("topk", topk=TOPK),
    )
    topk = TopKAttention(cfg)
    block = TopKAttention(cfg.with_attention(AttentionConfig("topk", topk=TOPK, block_size=BLOCK, block_budget=BUDGET)))

    def naive():
        s = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        s = s.masked_fill(~ctx.visible, float("-inf"))
        return torch.softmax(s, -1) @ v

    return {
        "naive_dense": naive,
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "ragtop_topk_exact": lambda: topk.attend(q, k, v, ctx),
        "ragtop_topk_block": lambda: block.attend(q, k, v, ctx),
    }


@torch.no_grad()
def _peak_child(impl: str, T: int, d: int) -> None:
    """Run in a fresh process: peak RSS growth (bytes) caused by one call of `impl`."""
    torch.set_num_threads(1)
    fns = _prefill_impls(T, d)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.thread_time()
    fns[impl]()
    dt = time.thread_time() - t  # CPU seconds (see _cpu_time)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_bytes": (after - before) * 1024, "seconds": dt}))


def measure_prefill(T: int, d: int) -> dict:
    out = {}
    for impl in ("naive_dense", "sdpa_dense", "ragtop_topk_exact", "ragtop_topk_block"):
        r = subprocess.run(
            [sys.executable, "-m", "ragtop.study.analyze", impl, str(T), str(d)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        out[impl] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}
    return out


@torch.no_grad()
def measure_decode(L: int, d: int = 512, repeats: int = 5) -> dict:
    H = d // HEAD_DIM
    g = torch.Generator().manual_seed(0)
    q = torch.randn(H, HEAD_DIM, generator=g)
    k, v = torch.randn(H, L, HEAD_DIM, generator=g), torch.randn(H, L, HEAD_DIM, generator=g)
    kmin, kmax = block_summaries(k, BLOCK)  # kept up to date by the cache; not per-step work
    t = {
        "dense": _cpu_time(lambda: dense_decode(q, k, v), repeats),
        "sdpa_dense": _cpu_time(lambda: F.scaled_dot_product_attention(q[:, None], k, v), repeats),
        "topk_exact": _cpu_time(lambda: topk_decode(q, k, v, TOPK), repeats),
        "topk_block": _cpu_time(lambda: block_topk_decode(q, k, v, kmin, kmax, BLOCK, BUDGET, TOPK), repeats),
    }
    best_dense = min(t["dense"], t["sdpa_dense"])
    b = decode_bytes(L, d)
    return {
        "L": L,
        "d": d,
        "seconds": t,
        "speedup_exact": best_dense / t["topk_exact"],
        "speedup_block": best_dense / t["topk_block"],
        "bytes": b,
        "theory_speedup_exact": b["dense"] / b["topk_exact"],
        "theory_speedup_block": b["dense"] / b["topk_block"],
    }


def analyze(
    timing: bool = False,
    contexts: Sequence[int] = (1024, 4096, 16384),
    repeats: int = 5,
    prefill_sizes: Sequence[tuple[int, int]] = ((128, 64), (512, 256), (1024, 1024), (2048, 2048)),
) -> dict:
    report = {
        "study": "analyze",
        "constants": {"bytes": BYTES, "head_dim": HEAD_DIM, "topk": TOPK, "block": BLOCK, "budget": BUDGET},
        "claims": check_claims(),
        "theory_decode": [{"L": L, **decode_bytes(L, 512)} for L in contexts],
    }
    if timing:
        t0 = time.perf_counter()
        report["prefill"] = [
            {
                "d": d,
                "T": T,
                "flops": prefill_flops(T, d),
                "memory": prefill_memory(T, d),
                "measured": measure_prefill(T, d),
            }
            for d, T in prefill_sizes
        ]
        report["decode"] = [measure_decode(L, 512, repeats) for L in contexts]
        report["timing_seconds"] = round(time.perf_counter() - t0, 1)
        report["threads"] = torch.get_num_threads()
    return report


def _m(x: float) -> str:
    return f"{x / 1e6:,.1f}M"


def format_tables(r: dict) -> str:
    c = r["claims"]
    lines = [
        "FLOPs per layer (prefill, full square as the summary counts): claimed vs accounted",
        f"{'d':>5} {'T':>5} {'claim dense':>12} {'claim sparse':>12} {'2T²d':>10} {'dense':>10} "
        f"{'topk exact':>11} {'topk block':>11} {'k keys only':>11} {'dense/exact':>11} {'dense/block':>11}",
    ]
    for f in c["flops"]:
        lines.append(
            f"{f['d']:>5} {f['T']:>5} {_m(f['claimed_dense']):>12} {_m(f['claimed_sparse']):>12} {_m(f['2T2d']):>10} "
            f"{_m(f['dense']):>10} {_m(f['topk_exact']):>11} {_m(f['topk_block']):>11} {_m(f['k_keys_only']):>11} "
            f"{f['ratio_dense_vs_topk_exact']:>11.2f} {f['ratio_dense_vs_topk_block']:>11.2f}"
        )
    s = c["speedup_8k"]
    lines.append(
        f"8192 tokens, d=1024: claimed {s['claimed']:.0f}x; dense/exact {s['dense_over_topk_exact']:.2f}x, "
        f"dense/block {s['dense_over_topk_block']:.1f}x, dense/'k keys only' {s['dense_over_k_keys_only']:.0f}x, "
        f"decode bytes dense/block {s['decode_bytes_dense_over_block']:.1f}x"
    )
    lines.append("\nAttention memory (prefill scores): claimed vs formulas")
    lines.append(
        f"{'d':>5} {'T':>5} {'claim dense':>12} {'claim sparse':>12} {'T²·(d/8)·4':>12} {'T·32·(d/8)·4':>13} "
        f"{'topk computes':>13} {'KV cache':>10}"
    )
    for m in c["memory"]:
        lines.append(
            f"{m['d']:>5} {m['T']:>5} {_m(m['claimed_dense']):>12} {_m(m['claimed_sparse']):>12} "
            f"{_m(m['T2_H_4_with_H_d_over_8']):>12} {_m(m['T_k_H_4_with_k32']):>13} "
            f"{_m(m['topk_chunked_computes']):>13} {_m(m['kv_cache']):>10}"
        )
    if "prefill" in r:
        lines.append(
            f"\nMeasured prefill, one layer, heads = d/{HEAD_DIM}, {r['threads']} thread(s): CPU seconds of one call "
            "| peak RSS growth"
        )
        impls = ("naive_dense", "sdpa_dense", "ragtop_topk_exact", "ragtop_topk_block")
        lines.append(f"{'d':>5} {'T':>5} " + " ".join(f"{i:>24}" for i in impls))
        for p in r["prefill"]:
            cells = []
            for i in impls:
                m = p["measured"][i]
                cells.append(
                    f"{m['seconds']:>9.4f}s {m['peak_growth_bytes'] / 1e6:>9.1f}MB"
                    if "seconds" in m
                    else f"{'error':>24}"
                )
            lines.append(f"{p['d']:>5} {p['T']:>5} " + " ".join(f"{x:>24}" for x in cells))
        lines.append(
            f"\nMeasured decode, one token, one layer, d=512 (8 heads), k={TOPK}, blocks {BLOCK}x({BUDGET}+1): CPU ms "
            "(fastest of repeats) and speedup vs best dense"
        )
        lines.append(
            f"{'L':>6} {'dense':>8} {'sdpa':>8} {'exact':>8} {'block':>8} {'x exact':>8} {'x block':>8} "
            f"{'theory exact':>12} {'theory block':>12}"
        )
        for dd in r["decode"]:
            t = dd["seconds"]
            lines.append(
                f"{dd['L']:>6} {t['dense'] * 1e3:>8.3f} {t['sdpa_dense'] * 1e3:>8.3f} {t['topk_exact'] * 1e3:>8.3f} "
                f"{t['topk_block'] * 1e3:>8.3f} {dd['speedup_exact']:>8.2f} {dd['speedup_block']:>8.2f} "
                f"{dd['theory_speedup_exact']:>12.2f} {dd['theory_speedup_block']:>12.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # child process of measure_prefill
    _peak_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
