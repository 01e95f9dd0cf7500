"""`python -m loadtests admission`: concurrent requests at a fixed KV-cache budget, paged
cache (blocks allocated as sequences grow) vs whole-context reservation.

One in-process engine over an exported folder, twice, with the same cache memory
(`--budget-contexts` whole contexts of `--context` tokens): contiguous slots (each admitted
request reserves a whole context) and the paged graph (pages as sequences grow, preemption
by recompute when the pool runs out). The workload arrives all at once: a mix of short
requests and a fraction of long ones (default 90 % prompts of 128 tokens, 10 % of 8000;
32 new tokens each, greedy, ignore_eos). Reported per mode: the peak and mean number of
requests running at once (`IterationStats.num_running`, every step), preemptions, requests
finished and failed, steps and wall time; and whether both modes generated the same tokens.

    python -m loadtests admission --tiny                      # a tiny random model, 8k context
    python -m loadtests admission --model MODEL_DIR --context 2048 --long-prompt 1900

A folder without a paged graph is paged in a scratch folder (symlinks to its files, then
`ragtop.export.onnx.write_paged_graph`), so a shared export is never modified.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path


def tiny_export(out: Path, context: int) -> Path:
    """A tiny random dense model (2 layers, d=64) exported with --paged-kv and `context` tokens."""
    folder = out / "tiny-onnx"
    if (folder / "genai_config.json").exists():
        return folder
    from ragtop.checkpoint import save_checkpoint
    from ragtop.cli import main
    from ragtop.model import ModelConfig, Transformer
    from ragtop.train.tokenizer import train_bpe

    text = ["The committee reviewed the budget for the coming year and found the costs higher than planned."] * 8
    tok = train_bpe(text, vocab_size=300)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=context)
    ckpt = save_checkpoint(out / "tiny-ckpt", Transformer(cfg).eval(), tok.to_str(), generation={"eos_token_id": 0})
    if main(["export", str(ckpt), str(folder), "--no-validate", "--paged-kv", "--overwrite"]) != 0:
        raise SystemExit("export of the tiny model failed")
    return folder


def paged_folder(model: Path, scratch: Path) -> Path:
    """`model` itself when it has a paged graph; else a scratch folder that links its files and
    adds one."""
    cfg = json.loads((model / "genai_config.json").read_text())
    if cfg["ragtop"]["kv_cache"].get("paged"):
        return model
    from ragtop.export.onnx import write_paged_graph

    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for f in model.iterdir():
        if f.name == "genai_config.json":
            shutil.copy2(f, scratch / f.name)
        else:
            (scratch / f.name).symlink_to(f.resolve())
    write_paged_graph(scratch)
    return scratch


def workload(n: int, long_frac: float, short_prompt: int, long_prompt: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    n_long = round(n * long_frac)
    kinds = [True] * n_long + [False] * (n - n_long)
    rng.shuffle(kinds)
    return [[rng.randrange(1, vocab) for _ in range(long_prompt if k else short_prompt)] for k in kinds]


def run_mode(folder: Path, paged: bool, prompts, a: argparse.Namespace, budget_bytes: int) -> dict:
    from ragtop.runtime import EngineConfig, Request, SamplingParams, SchedulerConfig, load_model

    model = load_model(folder, threads=a.threads, paged=paged)
    config = EngineConfig(
        SchedulerConfig(max_batch_size=a.max_batch, max_tokens_per_step=a.step_tokens, prefill_chunk=a.prefill_chunk),
        context_limit=a.context,
        cache_memory_bytes=budget_bytes,
    )
    engine = model.engine(config)
    running, pages, preemptions = [], [], 0

    def observe(s) -> None:
        nonlocal preemptions
        running.append(s.num_running)
        pages.append(s.kv_cache_blocks_used)
        preemptions += s.num_preemptions

    engine.stats_listeners.append(observe)
    params = SamplingParams(max_tokens=a.output, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    out = engine.run_until_done([Request(str(i), p, params) for i, p in enumerate(prompts)])
    wall = time.perf_counter() - t0
    finals = [o[-1] for o in out.values()]
    tokens = {rid: [t for o in outs for d in o.deltas for t in d.token_ids] for rid, outs in out.items()}
    result = {
        "layout": "paged" if paged else "whole-context slots",
        "cache_bytes": engine.cache.usage().bytes_total,
        "slots" if not paged else "pages": engine.cache.plan.slots if not paged else engine.cache.pages.num_pages,
        "peak_running": max(running),
        "mean_running": round(statistics.fmean(running), 2),
        "peak_pages_used": max(pages) if paged else None,
        "preemptions": preemptions,
        "finished": sum(1 for f in finals if f.finished and f.error is None),
        "failed": sum(1 for f in finals if f.error is not None),
        "generated_tokens": sum(len(t) for t in tokens.values()),
        "steps": len(running),
        "wall_s": round(wall, 1),
    }
    engine.close()
    return {**result, "_tokens": tokens}


def add_arguments(sub) -> None:
    p = sub.add_parser("admission", help="concurrent requests at a fixed KV-cache budget: paged vs whole-context slots")
    p.add_argument("--model", type=Path, help="exported model folder (custom ops)")
    p.add_argument("--tiny", action="store_true", help="export and use a tiny random model instead")
    p.add_argument("--context", type=int, default=8192, help="context limit per request (default %(default)s)")
    p.add_argument("--budget-contexts", type=int, default=8, help="cache memory in whole contexts (default 8)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--long-frac", type=float, default=0.1)
    p.add_argument("--short-prompt", type=int, default=128)
    p.add_argument("--long-prompt", type=int, default=8000)
    p.add_argument("--output", type=int, default=32, help="new tokens per request")
    p.add_argument("--max-batch", type=int, default=64, help="max_batch_size of both engines")
    p.add_argument("--step-tokens", type=int, default=1024, help="max_tokens_per_step")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("build/admission"))
    p.set_defaults(func=cmd_admission)


def cmd_admission(a: argparse.Namespace) -> int:
    if not (a.model or a.tiny):
        raise SystemExit("give --model MODEL_DIR or --tiny")
    a.out.mkdir(parents=True, exist_ok=True)
    folder = tiny_export(a.out, a.context) if a.tiny else paged_folder(a.model, a.out / "paged-model")
    cfg = json.loads((folder / "genai_config.json").read_text())
    from ragtop.runtime import load_model

    spec = load_model(folder, threads=1).runner.spec
    budget = a.budget_contexts * a.context * spec.kv_bytes_per_token
    prompts = workload(a.requests, a.long_frac, a.short_prompt, a.long_prompt, int(cfg["model"]["vocab_size"]), a.seed)
    results = [run_mode(folder, paged, prompts, a, budget) for paged in (False, True)]
    same = results[0].pop("_tokens") == results[1].pop("_tokens")
    summary = {
        "peak_running_ratio": round(results[1]["peak_running"] / results[0]["peak_running"], 2),
        "mean_running_ratio": round(results[1]["mean_running"] / results[0]["mean_running"], 2),
        "same_tokens": same,
    }
    doc = {"args": {k: str(v) for k, v in vars(a).items() if k != "func"}, "results": results, "summary": summary}
    (a.out / "admission.json").write_text(json.dumps(doc, indent=1))
    print(
        f"budget {budget / 2**20:.1f} MiB = {a.budget_contexts} contexts of {a.context} tokens; {a.requests} requests, "
        f"{a.long_frac:.0%} of {a.long_prompt} prompt tokens, the rest {a.short_prompt}; {a.output} new tokens each"
    )
    for r in results:
        print(
            f"{r['layout']:>20}: peak running {r['peak_running']:3d}, mean {r['mean_running']:6.2f}, "
            f"preemptions {r['preemptions']}, finished {r['finished']}, failed {r['failed']}, "
            f"steps {r['steps']}, {r['wall_s']} s"
        )
    print(
        f"paged / whole-context: peak {summary['peak_running_ratio']}x, mean {summary['mean_running_ratio']}x; "
        f"same tokens: {same}"
    )
    return 0


def decode_speed(folder: Path, paged: bool, streams: int, prompt: int, new: int, threads: int, seed: int) -> dict:
    """Decode tokens per CPU-second and per second over the steps that only decoded (all
    `streams` sequences running), greedy, one engine."""
    from ragtop.runtime import EngineConfig, Request, SamplingParams, SchedulerConfig, load_model

    model = load_model(folder, threads=threads, paged=paged)
    engine = model.engine(
        EngineConfig(SchedulerConfig(max_batch_size=streams), context_limit=prompt + new + 32, prefix_caching=False)
    )
    rng = random.Random(seed)
    vocab = model.runner.spec.vocab_size
    for i in range(streams):
        engine.add_request(
            Request(
                str(i),
                [rng.randrange(1, vocab) for _ in range(prompt)],
                SamplingParams(max_tokens=new, temperature=0, ignore_eos=True),
            )
        )
    cpu = wall = 0.0
    tokens = 0
    generated: dict[str, list[int]] = {}
    while engine.has_work():
        c0, w0 = time.process_time(), time.perf_counter()
        outs = engine.step()
        for o in outs:
            generated.setdefault(o.request_id, []).extend(t for d in o.deltas for t in d.token_ids)
        c1, w1 = time.process_time(), time.perf_counter()
        running = engine.scheduler.running
        decoding = all(s.status == "decode" for g in running for s in g.seqs) and len(running) == streams
        if decoding and not any(o.finished for o in outs):
            cpu, wall = cpu + c1 - c0, wall + w1 - w0
            tokens += sum(len(d.token_ids) for o in outs for d in o.deltas)
    engine.close()
    return {
        "layout": "paged" if paged else "whole-context slots",
        "streams": streams,
        "decode_tokens": tokens,
        "tokens_per_cpu_s": round(tokens / cpu, 2) if cpu else None,
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "_tokens": generated,
    }


def step_cpu_ms(folder: Path, streams: int, length: int, threads: int, repeats: int, calls: int = 10) -> dict:
    """CPU milliseconds of one decode call of `streams` sequences holding `length` tokens each,
    straight through the runner (no engine), both layouts alternating. The caches hold zeros:
    the kernels' work depends on the lengths, not on the values."""
    from ragtop.runtime.runners.base import Chunk
    from ragtop.runtime.runners.onnxruntime import OrtRunner

    runners = {}
    for paged in (False, True):
        r = OrtRunner(folder, threads=threads, paged=paged)
        if paged:
            per = -(-(length + 1) // r.page_size)
            r.allocate_pages(streams * per)
            r.block_tables = [list(range(b * per, (b + 1) * per)) for b in range(streams)]
        else:
            r.allocate(streams, length + 1)
        runners[paged] = r
    chunks = [Chunk(b, [5], length, "last") for b in range(streams)]
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for paged, r in runners.items():
            r.forward(chunks)
            c0 = time.process_time()
            for _ in range(calls):
                r.forward(chunks)
            cpu[paged].append((time.process_time() - c0) / calls * 1000)
    return {
        "streams": streams,
        "length": length,
        "whole_context_ms": round(statistics.median(cpu[False]), 1),
        "paged_ms": round(statistics.median(cpu[True]), 1),
    }


def add_decode_arguments(sub) -> None:
    p = sub.add_parser("paged-decode", help="decode tokens per CPU-second: paged vs whole-context slots")
    p.add_argument("--model", type=Path, required=True, help="exported model folder (custom ops)")
    p.add_argument("--streams", default="1,8", help="concurrent sequences, comma-separated (default %(default)s)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each layout (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--step-only",
        action="store_true",
        help="CPU time of one decode call through the runner at --prompt cached tokens (no engine, no prefill)",
    )
    p.add_argument("--out", type=Path, default=Path("build/paged-decode"))
    p.set_defaults(func=cmd_decode)


def cmd_decode(a: argparse.Namespace) -> int:
    a.out.mkdir(parents=True, exist_ok=True)
    folder = paged_folder(a.model, a.out / "paged-model")
    if a.step_only:
        for streams in [int(x) for x in a.streams.split(",")]:
            r = step_cpu_ms(folder, streams, a.prompt, a.threads, max(3, a.repeats))
            print(
                f"{streams:2d} streams at {a.prompt} tokens: decode call {r['whole_context_ms']} ms CPU whole-context, "
                f"{r['paged_ms']} ms paged (median): paged / whole-context {r['whole_context_ms'] / r['paged_ms']:.2f}x"
            )
        return 0
    rows = []
    for streams in [int(x) for x in a.streams.split(",")]:
        best: dict[bool, dict] = {}
        for _ in range(a.repeats):  # alternate, so both layouts see the same machine load
            for paged in (False, True):
                r = decode_speed(folder, paged, streams, a.prompt, a.new, a.threads, a.seed)
                if paged not in best or (r["tokens_per_cpu_s"] or 0) > (best[paged]["tokens_per_cpu_s"] or 0):
                    best[paged] = r
        same = best[False].pop("_tokens") == best[True].pop("_tokens")
        best[True]["same_tokens_as_whole_context"] = same
        rows += [best[False], best[True]]
        ratio = best[True]["tokens_per_cpu_s"] / best[False]["tokens_per_cpu_s"]
        print(
            f"{streams:2d} streams: whole-context {best[False]['tokens_per_cpu_s']:.2f} tok/CPU-s "
            f"({best[False]['tokens_per_s']:.2f} tok/s), paged {best[True]['tokens_per_cpu_s']:.2f} tok/CPU-s "
            f"({best[True]['tokens_per_s']:.2f} tok/s): paged / whole-context {ratio:.2f}x; same tokens: {same}"
        )
    (a.out / "paged-decode.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(a).items() if k != "func"}, "rows": rows}, indent=1)
    )
    return 0
