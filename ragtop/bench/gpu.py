"""`ragtop bench gpu`: the device check of the Triton kernels (scripts/gpu_check.sh runs it).

Three parts, one run, JSON + tables:

1. correctness on the device: `block_topk_decode`, `update_block_summaries` and
   `ragged_embedding` against the PyTorch reference (TopKAttention.attend /
   block_summaries, RaggedEmbedding.forward) on small random shapes with GQA, sinks and a
   local window; max absolute error and pass/fail (1e-4).
2. one attention layer, one decode step: the Triton block-selection kernels (summary
   update for the new key + block bounds + decode) against
   `torch.nn.functional.scaled_dot_product_attention` (dense, GQA without copying the
   cache, the same fp32 cache) at each cache length and batch. Each step rotates over
   enough copies of the cache to exceed the GPU's L2, so both read from memory, as a model's
   layers would. Ratio = SDPA time / Triton time (> 1: block selection is faster).
3. end to end: greedy decode tokens/s of TorchRunner on the device, dense vs block selection
   (the same random weights: speed does not depend on their values), for the `small`
   preset's shape and SmolLM2-135M's shape, after a prefill of --context tokens per
   sequence, batch 1 and 16. The dense model is the reference code (SDPA after
   `repeat_interleave` of the KV heads for GQA), the one a `--device cuda` TorchRunner runs.

On a machine without CUDA it runs on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported): only `--quick` sizes make sense
there, and the figures are not speeds (the interpreter is numpy, op by op); that mode
exists so that the script is known to run before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SHAPES = {  # name: (query heads, KV heads, head dim), as `ragtop bench ops`
    "small": (8, 8, 32),
    "smollm2": (9, 3, 64),
    "tiny": (2, 1, 16),
}
MODELS = {  # name: ModelConfig fields (random weights)
    "small": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=688),
    "smollm2": dict(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536, rope_theta=100000.0
    ),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176),
}
L2_SPAN = 256 << 20  # kernel timing rotates over up to 16 cache copies totalling about this (H200 L2: 50 MB)
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Settings:
    device: str
    lengths: tuple[int, ...]
    batches: tuple[int, ...]
    shapes: tuple[str, ...]
    models: tuple[str, ...]
    e2e_batches: tuple[int, ...]
    context: int
    new_tokens: int
    topk: int
    e2e_topk: int
    block_size: int
    block_budget: int
    repeats: int


def int_list(text: str) -> tuple[int, ...]:
    """'8192,32768' -> (8192, 32768), each >= 1 (argparse turns the error into a usage line)."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def name_list(known: dict[str, Any]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: expected some of {', '.join(known)}")
        return names

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU interpreter check of this script)")
    p.add_argument("--lengths", type=int_list, default=(8192, 32768, 131072), help="cache lengths of the kernel timing")
    p.add_argument("--batches", type=int_list, default=(1, 16), help="batch sizes of the kernel timing")
    p.add_argument(
        "--shapes", type=name_list(SHAPES), default=("smollm2", "small"), help=f"attention shapes ({', '.join(SHAPES)})"
    )
    p.add_argument(
        "--models",
        type=name_list(MODELS),
        default=("small", "smollm2"),
        help=f"end-to-end model shapes ({', '.join(MODELS)})",
    )
    p.add_argument("--e2e-batches", type=int_list, default=(1, 16), help="sequences decoding together, end to end")
    p.add_argument("--context", type=int, default=8192, help="prompt tokens per sequence before the timed decode")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decode steps, end to end")
    p.add_argument("--topk", type=int, default=32, help="keys kept per query in the kernel timing")
    p.add_argument("--e2e-topk", type=int, default=256, help="keys kept per query end to end (the served SmolLM2's k)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--block-budget", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30, help="timed steps per kernel case (median)")
    p.add_argument("--json", type=str, default=None, help="also write the report here")


def settings_from(a: argparse.Namespace, cuda: bool) -> Settings:
    if a.quick:  # what the interpreter can do in seconds
        return Settings(
            device="cuda" if cuda else "cpu",
            lengths=(96,),
            batches=(1, 2),
            shapes=("tiny",),
            models=("tiny",),
            e2e_batches=(1,),
            context=40,
            new_tokens=2,
            topk=8,
            e2e_topk=8,
            block_size=16,
            block_budget=2,
            repeats=1,
        )
    return Settings(
        device="cuda" if cuda else "cpu",
        lengths=a.lengths,
        batches=a.batches,
        shapes=a.shapes,
        models=a.models,
        e2e_batches=a.e2e_batches,
        context=a.context,
        new_tokens=a.new_tokens,
        topk=a.topk,
        e2e_topk=a.e2e_topk,
        block_size=a.block_size,
        block_budget=a.block_budget,
        repeats=a.repeats,
    )


# -- timing -------------------------------------------------------------------------------
def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    import torch

    def once(fn: Callable[[], Any]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return once


# -- 1. correctness --------------------------------------------------------------------------
def check_correctness(device: str, quick: bool = False) -> list[dict[str, Any]]:
    import torch

    from ..gpu.kernels import block_topk_decode, ragged_embedding, update_block_summaries
    from ..model.attention import AttnContext, TopKAttention
    from ..model.config import AttentionConfig, EmbeddingConfig, ModelConfig
    from ..model.embedding import RaggedEmbedding

    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [  # (name, B, H, Hkv, Dh, L, topk, bs, budget, sinks, window)
        ("gqa", 3, 9, 3, 64, 700, 32, 64, 4, 0, 0),
        ("sinks+window", 2, 4, 2, 32, 500, 16, 32, 3, 4, 24),
        ("quest (topk >= candidates)", 2, 4, 4, 16, 300, 256, 16, 3, 0, 0),
    ]
    if quick:  # the interpreter runs one program at a time: fewer heads and sequences
        cases = [
            (name, 2, H // Hkv, 1, Dh, L, topk, bs, budget, sinks, window)
            for name, B, H, Hkv, Dh, L, topk, bs, budget, sinks, window in cases
        ]
    for name, B, H, Hkv, Dh, L, topk, bs, budget, sinks, window in cases:
        cfg = ModelConfig(
            vocab_size=8,
            d_model=H * Dh,
            n_layers=1,
            n_heads=H,
            n_kv_heads=Hkv,
            d_ff=8,
            max_seq_len=L,
            attention=AttentionConfig(
                kind="topk", topk=topk, block_size=bs, block_budget=budget, sink_tokens=sinks, local_window=window
            ),
        )
        ref = TopKAttention(cfg).to(device)
        q = torch.randn(B, H, 1, Dh, generator=gen).to(device)
        k = torch.randn(B, Hkv, L, Dh, generator=gen).to(device)
        v = torch.randn(B, Hkv, L, Dh, generator=gen).to(device)
        pos = torch.randint(0, L, (B,), generator=gen).to(device)
        pos[0] = L - 1
        j = torch.arange(L, device=device)
        ctx = AttnContext(None, None, pos[:, None], (j <= pos[:, None])[:, None, None, :], pos, False)
        nb = -(-L // bs)
        kmin = torch.zeros(B, Hkv, nb, Dh, device=device)
        kmax = torch.zeros_like(kmin)
        update_block_summaries(k, kmin, kmax, torch.zeros(B, dtype=torch.long, device=device), L, bs)
        want_min, want_max = ref.block_summaries(
            k, AttnContext(None, None, None, (j < L)[None, None, None, :], None, False)
        )
        summary_err = max((kmin - want_min).abs().max().item(), (kmax - want_max).abs().max().item())
        out = block_topk_decode(
            q[:, :, 0],
            k,
            v,
            kmin,
            kmax,
            pos,
            topk=topk,
            block_size=bs,
            block_budget=budget,
            scale=ref.scale,
            sink_tokens=sinks,
            local_window=window,
        )
        err = (out - ref.attend(q, k, v, ctx)[:, :, 0]).abs().max().item()
        rows.append({"check": f"block_topk_decode: {name}", "max_abs_err": err, "ok": err <= TOLERANCE})
        rows.append({"check": f"update_block_summaries: {name}", "max_abs_err": summary_err, "ok": summary_err == 0.0})
    cfg = ModelConfig(
        vocab_size=1000,
        d_model=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        d_ff=8,
        max_seq_len=8,
        embedding=EmbeddingConfig(kind="ragged", tier_sizes=(100, 300, 600), tier_widths=(64, 24, 8)),
    )
    emb = RaggedEmbedding(cfg)
    perm = torch.randperm(1000, generator=gen).tolist()
    emb.set_tiers([perm[:100], perm[100:400], perm[400:]])
    emb = emb.to(device)
    ids = torch.randint(0, 1000, (4, 16), generator=gen).to(device)
    out = ragged_embedding(ids, emb.tier_of, emb.row_of, list(emb.tables), [p.weight for p in emb.projs])
    err = (out - emb(ids)).abs().max().item()
    rows.append({"check": "ragged_embedding: 3 tiers, shuffled", "max_abs_err": err, "ok": err <= TOLERANCE})
    return rows


# -- 2. one layer, one decode step ------------------------------------------------------------
def time_kernels(s: Settings, say: Callable[[str], None], record: Callable[[dict[str, Any]], None]) -> None:
    """Every (shape, length, batch) case, each row handed to `record` as soon as it is measured."""
    for shape in s.shapes:
        for L in s.lengths:
            for B in s.batches:
                say(f"kernel {shape} L={L} B={B}")
                try:  # one GPU run is all there may be: a failing case must not lose the others
                    record(time_kernel_case(s, shape, L, B))
                except Exception as e:  # reported in the row, with its type
                    say(f"kernel {shape} L={L} B={B} failed: {e!r}")
                    record(
                        {
                            "shape": shape,
                            "heads": "/".join(map(str, SHAPES[shape])),
                            "tokens": L,
                            "batch": B,
                            "error": repr(e)[:500],
                        }
                    )
                    _free(s.device)


def make_caches(s: Settings, B: int, Hkv: int, L: int, Dh: int, copies: int) -> list[tuple]:
    """`copies` full caches (keys, values, block summaries), every key written."""
    import torch

    from ..gpu.kernels import update_block_summaries

    caches = []
    for _ in range(copies):
        k = torch.randn(B, Hkv, L, Dh, device=s.device)
        v = torch.randn(B, Hkv, L, Dh, device=s.device)
        kmin = torch.empty(B, Hkv, -(-L // s.block_size), Dh, device=s.device)
        kmax = torch.empty_like(kmin)
        update_block_summaries(k, kmin, kmax, torch.zeros(B, dtype=torch.long, device=s.device), L, s.block_size)
        caches.append((k, v, kmin, kmax))
    return caches


def time_kernel_case(s: Settings, shape: str, L: int, B: int) -> dict[str, Any]:
    """Median time of one decode step of one layer: SDPA vs the Triton block-selection kernels."""
    import torch
    import torch.nn.functional as F

    from ..gpu.kernels import block_topk_decode, update_block_summaries

    H, Hkv, Dh = SHAPES[shape]
    one = 2 * B * Hkv * L * Dh * 4  # bytes of K + V
    copies = 1 if s.device == "cpu" else max(1, min(16, -(-L2_SPAN // one)))
    caches = make_caches(s, B, Hkv, L, Dh, copies)
    q = torch.randn(B, H, 1, Dh, device=s.device)
    pos = torch.full((B,), L - 1, dtype=torch.long, device=s.device)
    scale = Dh**-0.5

    def sdpa(c: tuple) -> Any:
        return F.scaled_dot_product_attention(q, c[0], c[1], scale=scale, enable_gqa=H != Hkv)

    def block(c: tuple) -> Any:  # the decode step's whole attention work: summary of the new key too
        update_block_summaries(c[0], c[2], c[3], pos, 1, s.block_size)
        return block_topk_decode(
            q[:, :, 0], *c, pos, topk=s.topk, block_size=s.block_size, block_budget=s.block_budget, scale=scale
        )

    timer = _timer(s.device)
    row: dict[str, Any] = {"shape": shape, "heads": f"{H}/{Hkv}/{Dh}", "tokens": L, "batch": B, "cache_copies": copies}
    for name, fn in (("sdpa", sdpa), ("triton_block", block)):
        fn(caches[0])  # compile / warm up
        times = [timer(lambda c=caches[i % copies], fn=fn: fn(c)) for i in range(s.repeats)]
        row[f"{name}_ms"] = statistics.median(times) * 1e3
    row["speedup"] = row["sdpa_ms"] / row["triton_block_ms"]
    if s.device == "cuda":  # the same steps replayed from CUDA graphs: device time, no Python launch cost
        try:
            for name, fn in (("sdpa", sdpa), ("triton_block", block)):
                replays = [cuda_graph(lambda c=c, fn=fn: fn(c)) for c in caches]
                times = [timer(replays[i % copies]) for i in range(s.repeats)]
                row[f"{name}_graph_ms"] = statistics.median(times) * 1e3
            row["speedup_graph"] = row["sdpa_graph_ms"] / row["triton_block_graph_ms"]
        except Exception as e:  # the eager figures stand on their own
            row["graph_error"] = repr(e)[:300]
    del caches
    _free(s.device)
    return row


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], None]:
    """`fn` captured in a CUDA graph (warmed up on a side stream first, as torch requires);
    returns the replay. How an engine runs decode steps without per-kernel launch cost."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _free(device: str) -> None:
    """Give cached GPU memory back between cases (the largest cache is several GB)."""
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()


# -- 3. end to end ---------------------------------------------------------------------------
def decode_tokens_per_s(model, s: Settings, batch: int, triton: bool) -> float:
    """Prefill `context` random tokens per sequence, then time `new_tokens` greedy decode steps."""
    import torch

    from ..runtime.runners.base import Chunk
    from ..runtime.runners.torch import TorchRunner

    runner = TorchRunner(model, device=s.device, triton=triton)
    runner.allocate(batch, s.context + s.new_tokens + 1)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, s.context), generator=gen).tolist()
    step = 512
    for start in range(0, s.context, step):
        logits = runner.forward([Chunk(b, prompt[b][start : start + step], start) for b in range(batch)])
    total = 0.0
    for i in range(s.new_tokens + 1):  # step 0 warms up (compiles the kernels): not timed
        chunks = [Chunk(b, [int(logits[b].argmax())], s.context + i) for b in range(batch)]
        t = time.perf_counter()
        logits = runner.forward(chunks)  # logits come back to the CPU: the device is synchronised
        total += (time.perf_counter() - t) if i else 0.0
    runner.close()
    return batch * s.new_tokens / total


def time_end_to_end(s: Settings, say: Callable[[str], None], record: Callable[[dict[str, Any]], None]) -> None:
    """Dense vs block decode tok/s per (model, batch), each row handed to `record`."""
    import torch

    from ..model import AttentionConfig, ModelConfig, Transformer

    for name in s.models:
        base = ModelConfig(**MODELS[name], max_seq_len=s.context + s.new_tokens + 1)
        variants = {
            "dense": AttentionConfig(),
            "block": AttentionConfig(
                kind="topk", topk=s.e2e_topk, block_size=s.block_size, block_budget=s.block_budget
            ),
        }
        torch.manual_seed(0)
        weights = Transformer(base).state_dict()
        for B in s.e2e_batches:
            row: dict[str, Any] = {"model": name, "context": s.context, "batch": B}
            for label, attention in variants.items():
                say(f"end to end {name} B={B} {label}")
                model = Transformer(base.with_attention(attention)).eval()
                model.load_state_dict(weights)
                try:
                    row[f"{label}_tok_s"] = decode_tokens_per_s(model, s, B, triton=label == "block")
                except ImportError:
                    raise
                except Exception as e:  # reported in the row
                    say(f"end to end {name} B={B} {label} failed: {e!r}")
                    row["error"] = f"{label}: {e!r}"[:500]
                del model
                _free(s.device)
            if "error" not in row:
                row["speedup"] = row["block_tok_s"] / row["dense_tok_s"]
            record(row)


# -- report ----------------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    import torch
    import triton

    env = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _graph_cells(k: dict[str, Any]) -> str:
    if "speedup_graph" in k:
        return f" {k['sdpa_graph_ms']:.3f} ms | {k['triton_block_graph_ms']:.3f} ms | {k['speedup_graph']:.2f}x |"
    return f" {'failed: ' + k['graph_error'] if 'graph_error' in k else '-'} | | |"


def format_report(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [f"environment: {json.dumps(r['environment'])}", "", "| check | max abs err | ok |", "|---|---:|---|"]
    lines += [f"| {c['check']} | {c['max_abs_err']:.2e} | {'yes' if c['ok'] else 'NO'} |" for c in r["correctness"]]
    lines += [
        "",
        f"One layer, one decode step (topk={s['topk']}, block_size={s['block_size']}, "
        f"block_budget={s['block_budget']}, fp32); speedup = SDPA / Triton block selection; "
        "'graph': the same step replayed from a CUDA graph (no Python launch cost).",
        "",
        "| shape (H/Hkv/Dh) | tokens | batch | SDPA | Triton block | speedup | SDPA, graph | Triton block, graph | "
        "speedup, graph |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k['shape']} ({k['heads']}) | {k['tokens']} | {k['batch']} | "
        + (
            f"{k['sdpa_ms']:.3f} ms | {k['triton_block_ms']:.3f} ms | {k['speedup']:.2f}x |"
            if "error" not in k
            else f"failed: {k['error']} | | |"
        )
        + _graph_cells(k)
        for k in r["kernels"]
    ]
    lines += [
        "",
        f"End to end: greedy decode tokens/s of TorchRunner after a {s['context']}-token prefill "
        f"(block: topk={s['e2e_topk']}).",
        "",
        "| model | batch | dense tok/s | block tok/s | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {e['model']} | {e['batch']} | "
        + (
            f"{e['dense_tok_s']:.1f} | {e['block_tok_s']:.1f} | {e['speedup']:.2f}x |"
            if "error" not in e
            else f"failed: {e['error']} | | |"
        )
        for e in r["end_to_end"]
    ]
    if "end_to_end_error" in r:
        lines.append(r["end_to_end_error"])
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "no CUDA device: run with TRITON_INTERPRET=1 (Triton's interpreter, --quick sizes) "
            "or on a machine with a GPU"
        )
    s = settings_from(a, cuda)
    say = lambda msg: print(f"[bench gpu] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {
        "environment": environment(s.device),
        "settings": s.__dict__,
        "correctness": [],
        "kernels": [],
        "end_to_end": [],
    }

    def save() -> None:  # after every part: a run cut short by its timeout keeps what it measured
        if a.json:
            with open(a.json, "w") as f:
                f.write(json.dumps(report, indent=1) + "\n")

    say("correctness")
    report["correctness"] = check_correctness(s.device, quick=a.quick)
    save()
    time_kernels(s, say, lambda row: (report["kernels"].append(row), save()))
    try:  # TorchRunner needs ragtop's runtime deps (safetensors, tqdm, numpy): say so if absent
        time_end_to_end(s, say, lambda row: (report["end_to_end"].append(row), save()))
    except ImportError as e:
        report["end_to_end_error"] = f"end to end not measured: {e}"
        say(report["end_to_end_error"])
    save()
    print(json.dumps(report, indent=1))
    print(format_report(report))
    failed = [r for r in report["kernels"] + report["end_to_end"] if "error" in r]
    return 0 if all(c["ok"] for c in report["correctness"]) and not failed else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m ragtop.bench.gpu`: the same as `ragtop bench gpu`, without the CLI's other
    imports (the GPU machine has torch and triton, not necessarily the rest of ragtop's deps)."""
    p = argparse.ArgumentParser(prog="python -m ragtop.bench.gpu", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
