"""The long-context sweep and the concurrency sweep (each one run, one JSON document).

Context sweep: for each model and prompt length, one `ragtop serve` process per mode, sized
for that length (`--max-batch-size 1 --context-limit L + new + 16`), answers `repeats`
single requests of exactly L prompt tokens and `new` output tokens (greedy, ignore_eos);
then the peers run on the same weights in their own processes. Modes:

| mode | what is served |
|---|---|
| dense | the dense weights exported with `--ops standard` (MatMul/Softmax attention over the shared, in-place cache) |
| dense-plugin | the dense checkpoint's custom-op export (TopKAttention, k = context: the plugin's dense path) |
| topk | `ragtop convert --attention topk --topk K` of the same weights, plugin (exact top-k) |
| topk-block | `... --block-size BS --block-budget BB`, plugin (block selection, then exact top-k) |
| fallback | the topk export served with `--no-plugin`: the standard-op function bodies |
| transformers (peer) | `generate` on a LlamaForCausalLM with the same weights, SDPA, CPU |
| stock-ort (peer) | the dense weights exported with `--ops standard`, plain onnxruntime, shared buffers |
| llama.cpp (peer) | llama-cpp-python on the GGUF ragtop imports (SmolLM2 only; `make bench-peers`) |
| ort-genai (peer) | onnxruntime-genai on the int4 model its builder makes from the same weights |
| ragtop-engine | ragtop's LLMEngine in-process on the topk export (the served mode without HTTP) |

`--weights int4` (or int8, fp16) exports every served mode with those weights (`ragtop export
--weights`; a GGUF import keeps the file's own blocks); `--rounds N` repeats every mode and
peer at a length N times, interleaved (A, B, C, A, B, C), and reports the median round.

Figures per row: decode tokens/s (best request: (n-1)/(e2e-ttft)), TTFT (best), peak
resident memory of the serving process (VmHWM), speedup vs dense at the same length in the
same run (against the faster of the two served dense paths), bytes read per decoded token and %
of the bandwidth bound (bandwidth.py), and the
server's own decode tokens/s from its counters (Δ decode_tokens / Δ decode_seconds; a real
Prometheus' rate() when `prometheus` is installed) next to the client's aggregate figure.

Concurrency sweep: one server (the default model unless --model), closed loops of C clients
for each level, then an all-at-once burst to find where it starts answering 429.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import SCHEMA, bandwidth, peers
from .loadgen import LoadConfig, machine, run_load
from .metrics import format_summary, parse_slos
from .server import ServerProcess

SERVED_MODES = ("dense", "dense-plugin", "topk", "topk-block", "fallback")
# mode -> (checkpoint variant, export ops, export folder suffix). dense: the standard-op graph
# (MatMul/Softmax over the shared cache); dense-plugin: TopKAttention with k = context through
# the plugin; fallback: the top-k export served with --no-plugin.
MODE_EXPORTS = {
    "dense": ("dense", "standard", "dense-standard"),
    "dense-plugin": ("dense", "custom", "dense"),
    "topk": ("topk", "custom", "topk"),
    "topk-block": ("topk-block", "custom", "topk-block"),
    "fallback": ("topk", "custom", "topk"),
}
DENSE_MODES = ("dense", "dense-plugin")
PEERS = ("transformers", "stock-ort")  # the default peers (make bench): no extra packages
ALL_PEERS = peers.KINDS  # + llama.cpp and ort-genai (the `peers` extra) and ragtop's in-process engine
DEFAULT_MODELS = ("small=runs/small-dense-uniform:32768", "smollm2=smollm2:8192")
RESULTS = Path("docs/benchmarks")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ragtop_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from ragtop.cli import main; sys.exit(main())", *args]


def sh(cmd: list[str], log_path: Path | None = None, nice: int = 0, env: dict | None = None) -> None:
    shown = ["ragtop", *cmd[3:]] if cmd[:1] == [sys.executable] else cmd
    log("$ " + " ".join(shlex.quote(c) for c in shown))
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115
    try:
        pre = (lambda: os.nice(nice)) if nice else None
        rc = subprocess.call(
            cmd,
            stdout=out or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=pre,
            env={**os.environ, **(env or {})},
        )
    finally:
        if out:
            out.close()
    if rc != 0:
        raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}" + (f" (log: {log_path})" if log_path else ""))


# ----------------------------------------------------------------------------------------------------------------
# model preparation


@dataclass
class ModelSpec:
    name: str
    source: str  # checkpoint folder, or "smollm2" (imported), or "tiny" (a random tiny model)
    max_context: int

    @staticmethod
    def parse(text: str) -> ModelSpec:
        name, sep, rest = text.partition("=")
        src, _, maxlen = rest.rpartition(":")
        if not sep or not src or not maxlen.isdigit():
            raise ValueError(f"model {text!r}: expected NAME=CHECKPOINT:MAX_CONTEXT (CHECKPOINT may be 'smollm2')")
        return ModelSpec(name, src, int(maxlen))


def tiny_checkpoint(out: Path, n_heads: int = 4) -> Path:
    """A random tiny dense model (for --quick runs and tests): nothing to download or train.
    n_heads=2 gives 16-wide heads (onnxruntime's GroupQueryAttention needs a multiple of 16)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch

    from ragtop.checkpoint import save_checkpoint
    from ragtop.model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer
    from ragtop.train.tokenizer import train_bpe

    from .workload import BASE_TEXT

    tok = train_bpe([BASE_TEXT] * 8, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_layers=2,
        n_heads=n_heads,
        n_kv_heads=n_heads // 2,
        d_ff=64,
        max_seq_len=256,
        attention=AttentionConfig(),
        embedding=EmbeddingConfig(),
    )
    eos = tok.token_to_id("<|endoftext|>")
    eos = 0 if eos is None else eos
    return save_checkpoint(
        out, Transformer(cfg).eval(), tok.to_str(), generation={"bos_token_id": eos, "eos_token_id": eos}
    )


def base_checkpoint(spec: ModelSpec, work: Path, logs: Path) -> Path:
    if spec.source == "tiny":
        return tiny_checkpoint(work / "checkpoints" / spec.name)
    if spec.source == "smollm2":
        out = work / "checkpoints" / spec.name
        if not (out / "model.safetensors").is_file():
            shutil.rmtree(out, ignore_errors=True)
            sh(ragtop_cmd("import", "smollm2", "--out", str(out)), logs / f"{spec.name}-import.log")
        return out
    path = Path(spec.source)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"model {spec.name}: {path} is not a checkpoint folder (no model.safetensors)")
    return path


def variant_checkpoint(base: Path, mode: str, s: argparse.Namespace, work: Path, name: str, logs: Path) -> Path:
    """The checkpoint a mode serves: the same weights converted training-free."""
    if mode == "dense":
        att = json.loads((base / "config.json").read_text())["model"]["attention"]["kind"]
        if att == "dense":
            return base
        args = ["--attention", "dense"]
    elif mode == "topk":
        args = ["--attention", "topk", "--topk", str(s.topk)]
    elif mode == "topk-block":
        args = [
            "--attention",
            "topk",
            "--topk",
            str(s.topk),
            "--block-size",
            str(s.block_size),
            "--block-budget",
            str(s.block_budget),
        ]
    else:
        raise ValueError(mode)
    out = work / "checkpoints" / f"{name}-{mode}"
    if not (out / "model.safetensors").is_file():
        shutil.rmtree(out, ignore_errors=True)
        sh(ragtop_cmd("convert", str(base), "--out", str(out), *args), logs / f"{name}-{mode}-convert.log")
    return out


def exported(ckpt: Path, out: Path, max_context: int, logs: Path, ops: str = "custom", weights: str = "fp32") -> Path:
    """`ragtop export` once per (variant, max context, weights); reused by later runs."""
    stamp = out / "loadtests.json"
    want = {"checkpoint": str(ckpt.resolve()), "max_context": max_context, "ops": ops}
    if weights != "fp32":
        want["weights"] = weights
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (out / "model.onnx").is_file():
        return out
    extra = ["--weights", weights] if weights != "fp32" else []
    sh(
        ragtop_cmd(
            "export",
            str(ckpt),
            str(out),
            "--max-context",
            str(max_context),
            "--ops",
            ops,
            "--no-validate",
            "--overwrite",
            *extra,
        ),
        logs / f"{out.name}-export.log",
    )
    stamp.write_text(json.dumps(want))
    return out


# ----------------------------------------------------------------------------------------------------------------
# context sweep


def served_row(
    model_dir: Path, mode: str, spec: ModelSpec, context: int, s: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    row = _blank_row(mode, spec, context, s)
    limit = context + s.new_tokens + 16
    args = [
        "--max-batch-size",
        "1",
        "--max-waiting",
        "4",
        "--context-limit",
        str(limit),
        "--log-level",
        "warning",
        "--served-model-name",
        f"{spec.name}-{mode}",
    ]
    if s.threads:
        args += ["--threads", str(s.threads)]
    if mode == "fallback":
        args.append("--no-plugin")
    row["server_args"] = args
    server = ServerProcess(
        model_dir,
        args,
        env={"RAGTOP_PLUGIN": "0"} if mode == "fallback" else None,
        log_path=logs / f"serve-{spec.name}-{mode}-{context}.log",
    )
    prom = None
    try:
        server.start(timeout=s.start_timeout)
        if s.prometheus != "off":
            from .prometheus_server import PrometheusServer

            prom = PrometheusServer.maybe_start(
                server.url, logs / f"prometheus-{spec.name}-{mode}-{context}", required=s.prometheus == "require"
            )
        cfg = LoadConfig(
            url=server.url,
            num_requests=s.repeats,
            input_len=context,
            output_len=s.new_tokens,
            max_concurrency=1,
            warmup=1,
            progress=False,
            label=f"{spec.name} {mode} {context}",
            timeout_s=s.request_timeout,
            settle_s=2.0 if prom is not None else 0.0,
        )
        doc = asyncio.run(run_load(cfg))
        row["peak_rss_bytes"] = server.peak_rss()
        ok = [r for r in doc["requests"] if r["ok"]]
        row["requests"] = [
            {k: r[k] for k in ("ttft", "tpot", "e2e", "output_tokens", "status", "error")} for r in doc["requests"]
        ]
        if not ok:
            raise RuntimeError(f"no request succeeded: {doc['requests'][0]['status']} {doc['requests'][0]['error']}")
        rates = [1 / r["tpot"] for r in ok if r["tpot"]]
        row["decode_tokens_per_s"] = max(rates) if rates else None
        row["ttft_s"] = min(r["ttft"] for r in ok)
        dec_tok = sum(r["output_tokens"] - 1 for r in ok)
        dec_s = sum(r["e2e"] - r["ttft"] for r in ok)
        row["client_decode_tokens_per_s_aggregate"] = dec_tok / dec_s if dec_s > 0 else None
        srv = doc["server"] or {}
        row["server"] = srv
        all_dec = (srv.get("decode") or {}).get("all")
        row["server_decode_tokens_per_s"] = all_dec["tokens_per_s"] if all_dec else None
        row["server_decode_source"] = srv.get("source")
        row["server_decode_two_scrapes"] = row["server_decode_tokens_per_s"]
        if prom is not None:
            # the window opens one scrape interval before the run: after the warm-up and the settle pause
            row["prometheus"] = prom.decode_rate(since=doc["started_at"] - 1.0)
            if row["prometheus"].get("tokens_per_s"):
                row["server_decode_tokens_per_s"] = row["prometheus"]["tokens_per_s"]
                row["server_decode_source"] = "Prometheus rate() over the context-bucket counters"
        if row["server_decode_tokens_per_s"] and row["client_decode_tokens_per_s_aggregate"]:
            row["server_vs_client"] = row["server_decode_tokens_per_s"] / row["client_decode_tokens_per_s_aggregate"]
        row["kv_cache_total_bytes"] = srv.get("kv_cache_total_bytes")
        row["server_peak_rss_gauge_bytes"] = srv.get("peak_resident_memory_bytes")
        row["ok"] = True
    except Exception as e:  # one failed point must not lose the sweep
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"  {spec.name} {mode} {context}: FAILED {row['error'][:300]}")
    finally:
        if prom is not None:
            prom.stop()
        if row["peak_rss_bytes"] is None:
            row["peak_rss_bytes"] = server.peak_rss()
        server.stop()
    return row


def peer_row(
    kind: str,
    path: Path,
    spec: ModelSpec,
    context: int,
    s: argparse.Namespace,
    logs: Path,
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """One peer measurement in its own process (its peak RSS is its own). llama.cpp killed by a
    signal (its AMX kernels crash on some virtual machines: SIGSEGV in ggml_backend_amx_mul_mat)
    is run again with `--no-repack`, and the row says so."""
    row = _blank_peer_row(kind, spec, context, s)
    out = logs / f"peer-{spec.name}-{kind}-{context}.json"
    cmd = [
        sys.executable,
        "-m",
        "loadtests",
        "peer",
        kind,
        str(path),
        "--context",
        str(context),
        "--new-tokens",
        str(s.new_tokens),
        "--json",
        str(out),
    ] + (["--threads", str(s.threads)] if s.threads else [])
    if tokenizer is not None and kind in ("llama.cpp", "ort-genai", "ragtop-engine"):
        cmd += ["--tokenizer", str(tokenizer)]
    err_log = logs / f"peer-{spec.name}-{kind}-{context}.log"
    crashed = LLAMA_CRASHED.get("signal")
    if kind == "llama.cpp" and crashed:  # once is enough: later points of this run go straight to --no-repack
        cmd.append("--no-repack")
    try:
        out.unlink(missing_ok=True)
        with open(err_log, "wb") as err:
            rc = subprocess.run(cmd, timeout=s.request_timeout, stdout=subprocess.DEVNULL, stderr=err).returncode
        if rc < 0 and kind == "llama.cpp" and not crashed:
            log(f"  llama.cpp died of signal {-rc}: again with --no-repack (no AMX / repacked weights)")
            LLAMA_CRASHED["signal"] = crashed = -rc
            with open(err_log, "ab") as err:
                rc = subprocess.run(
                    cmd + ["--no-repack"], timeout=s.request_timeout, stdout=subprocess.DEVNULL, stderr=err
                ).returncode
        if kind == "llama.cpp" and crashed:
            row["note"] = (
                f"llama.cpp with its defaults died of signal {crashed} here (in its AMX kernels on this "
                "machine); measured with --no-repack (its extra CPU buffer types, AMX and weight "
                "repacking, off)"
            )
        if rc != 0:
            tail = err_log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"peer exited with {rc}: {tail[0][:300]} (log: {err_log})")
        r = peers.read_result(out)
        row.update(
            decode_tokens_per_s=r["decode_tokens_per_s"],
            ttft_s=r["ttft_s"],
            peak_rss_bytes=r["peak_rss_bytes"],
            ok=True,
            peer_details=r,
        )
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"  {spec.name} {kind} {context}: FAILED {row['error'][:300]}")
    return row


LLAMA_CRASHED: dict[str, int] = {}  # the signal llama.cpp died of with its defaults, in this run


def _blank_row(mode: str, spec: ModelSpec, context: int, s: argparse.Namespace) -> dict[str, Any]:
    """A result row before its run: every figure None, not ok (served modes and peers alike)."""
    return {
        "model": spec.name,
        "mode": mode,
        "context": context,
        "new_tokens": s.new_tokens,
        "ok": False,
        "error": None,
        "decode_tokens_per_s": None,
        "ttft_s": None,
        "peak_rss_bytes": None,
        "speedup_vs_dense": None,
        "bytes_per_token": None,
        "bandwidth_bound_pct": None,
        "server_decode_tokens_per_s": None,
    }


def _blank_peer_row(kind: str, spec: ModelSpec, context: int, s: argparse.Namespace) -> dict[str, Any]:
    return {**_blank_row(kind, spec, context, s), "peer": True}


def failed_peer_row(kind: str, spec: ModelSpec, context: int, s: argparse.Namespace, error: str) -> dict[str, Any]:
    """The row of a peer that could not be prepared (its package missing, no GGUF for this model)."""
    return {**_blank_peer_row(kind, spec, context, s), "error": error}


def prepare_peers(
    s: argparse.Namespace,
    spec: ModelSpec,
    base: Path,
    dirs: dict[str, Path],
    export_ctx: int,
    work: Path,
    logs: Path,
    notes: list[str],
) -> tuple[dict[str, Path], dict[str, str]]:
    """What each requested peer runs on, made once and cached under the work folder; a peer that
    cannot be prepared gets an error (written into its rows), the others still run."""
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for kind in s.peers:
        try:
            if kind == "stock-ort":
                dense = variant_checkpoint(base, "dense", s, work, spec.name, logs)
                paths[kind] = exported(
                    dense, work / "exports" / f"{spec.name}-dense-standard", export_ctx, logs, ops="standard"
                )
            elif kind == "transformers":
                paths[kind] = variant_checkpoint(base, "dense", s, work, spec.name, logs)
            elif kind == "llama.cpp":
                paths[kind] = gguf_of(spec)
                peers.require(kind)
            elif kind == "ort-genai":
                peers.require(kind)  # before the conversion: a missing package fails at once
                dense = variant_checkpoint(base, "dense", s, work, spec.name, logs)
                log(f"{spec.name}: onnxruntime-genai's builder (int4, cached in {work / 'peers'})")
                paths[kind] = peers.prepare_ort_genai(
                    dense,
                    work / "peers" / f"{spec.name}-ort-genai-int4",
                    export_ctx,
                    logs / f"{spec.name}-ort-genai-build.log",
                )
            elif kind == "ragtop-engine":
                paths[kind] = dirs["topk"]
            else:
                raise ValueError(f"unknown peer {kind!r}; choose from {', '.join(ALL_PEERS)}")
        except Exception as e:
            errors[kind] = str(e) if isinstance(e, peers.PeerMissing) else f"{type(e).__name__}: {e}"
            notes.append(f"{spec.name}: peer {kind} not run: {errors[kind]}")
            log(notes[-1])
    return paths, errors


def gguf_of(spec: ModelSpec) -> Path:
    """The GGUF llama.cpp runs: the file ragtop imported (only SmolLM2's is known here)."""
    if spec.source != "smollm2":
        raise ValueError(
            f"llama.cpp needs a GGUF file: model {spec.name} ({spec.source}) has none "
            "(only smollm2, imported from its GGUF, has)"
        )
    from ragtop.convert.gguf import smollm2_path

    return smollm2_path()


def served_facts(facts: dict[str, Any], export_dir: Path, weights: str) -> dict[str, Any]:
    """The byte model of an export: its own weight bytes (quantized weights) and KV dtype."""
    try:
        kv = bandwidth.onnx_kv_dtype_bytes(export_dir / "model.onnx")
        wbytes = bandwidth.onnx_weight_bytes(export_dir / "model.onnx") if weights != "fp32" else None
    except Exception as e:  # the byte model must never lose a measurement
        log(f"  bytes per token of {export_dir}: {type(e).__name__}: {e}; fp32 assumed")
        return facts
    return bandwidth.with_bytes(facts, wbytes, kv)


def peer_facts(
    kind: str, facts: dict[str, Any], path: Path | None, topk_dir: Path | None, weights: str
) -> dict[str, Any]:
    """The byte model of what a peer reads: llama.cpp the GGUF's tensors and an fp16 KV cache
    (its default), ORT GenAI its own graph's initializers and cache dtype."""
    try:
        if kind == "llama.cpp" and path is not None:
            return bandwidth.with_bytes(facts, bandwidth.gguf_weight_bytes(path), 2)
        if kind == "ort-genai" and path is not None:
            model = path / "model.onnx"
            return bandwidth.with_bytes(facts, bandwidth.onnx_weight_bytes(model), bandwidth.onnx_kv_dtype_bytes(model))
        if kind == "ragtop-engine" and topk_dir is not None:
            return served_facts(facts, topk_dir, weights)
    except Exception as e:
        log(f"  bytes per token of {kind}: {type(e).__name__}: {e}; fp32 weights assumed")
    return facts


def combine_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, mode, context) from interleaved rounds: the round with the median
    decode speed stands for the point, with the median TTFT and the largest peak RSS; every
    round's figures stay in `rounds`."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["mode"], r["context"]), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        ok = [r for r in group if r["ok"] and r["decode_tokens_per_s"]]
        if not ok:
            out.append({**group[0], "rounds": [{"ok": r["ok"], "error": r["error"]} for r in group]})
            continue
        ok.sort(key=lambda r: r["decode_tokens_per_s"])
        ttfts = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
        rss = [r["peak_rss_bytes"] for r in ok if r["peak_rss_bytes"]]
        row = dict(ok[(len(ok) - 1) // 2])  # the lower median: no invented average of two runs
        row["ttft_s"] = ttfts[(len(ttfts) - 1) // 2] if ttfts else None
        row["peak_rss_bytes"] = max(rss) if rss else None
        row["rounds"] = [
            {
                "ok": r["ok"],
                "error": r["error"],
                "decode_tokens_per_s": r["decode_tokens_per_s"],
                "ttft_s": r["ttft_s"],
                "peak_rss_bytes": r["peak_rss_bytes"],
            }
            for r in group
        ]
        out.append(row)
    return out


def context_sweep(s: argparse.Namespace) -> dict[str, Any]:
    work, out_json = Path(s.work_dir), Path(s.out)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    started = time.time()
    try:
        from ragtop.runtime.plugin import plugin_library_path

        plugin = plugin_library_path()
    except ImportError:
        plugin = None
    if plugin is None:
        notes.append("the ragtop plugin library is not built: every served mode ran the standard-op fallbacks")
    bw = None
    if not s.no_bandwidth:
        log(f"bandwidth probe ({s.bandwidth_mb} MiB, {s.threads or os.cpu_count()} threads)")
        bw = bandwidth.probe(s.bandwidth_mb, s.threads or os.cpu_count() or 1)
        log(f"  read {bw['read_gbps']:.2f} GB/s")
    rows: list[dict[str, Any]] = []
    models = [ModelSpec.parse(m) for m in s.models]
    for spec in models:
        lengths = [L for L in s.lengths if L <= spec.max_context]
        skipped = [L for L in s.lengths if L not in lengths]
        if skipped:
            notes.append(f"{spec.name}: prompt lengths {skipped} exceed its {spec.max_context}-token limit, not run")
        if not lengths:
            continue
        try:
            base = base_checkpoint(spec, work, logs)
        except Exception as e:
            notes.append(f"{spec.name}: not run: {type(e).__name__}: {e}")
            log(notes[-1])
            continue
        facts = bandwidth.model_facts(base)
        export_ctx = -(-(max(lengths) + s.new_tokens + 16) // 256) * 256
        weights = getattr(s, "weights", "fp32")
        wsuffix = "" if weights == "fp32" else f"-{weights}"
        dirs: dict[str, Path] = {}
        wanted = list(s.modes) + (["topk"] if "ragtop-engine" in s.peers and "topk" not in s.modes else [])
        for mode in wanted:
            variant, ops, suffix = MODE_EXPORTS[mode]
            if suffix not in dirs:
                ck = variant_checkpoint(base, variant, s, work, spec.name, logs)
                dirs[suffix] = exported(
                    ck, work / "exports" / f"{spec.name}-{suffix}{wsuffix}", export_ctx, logs, ops=ops, weights=weights
                )
        peer_paths, peer_errors = prepare_peers(s, spec, base, dirs, export_ctx, work, logs, notes)
        if weights != "fp32" and dirs:
            first = next(iter(dirs.values()))
            notes.append(
                f"{spec.name}: ragtop's served modes ran `ragtop export --weights {weights}`: "
                f"{served_facts(facts, first, weights)['weight_bytes_read'] / 1e6:.1f} MB of weights read "
                "per decoded token (the bytes/token column counts each system's own weights and cache dtype)"
            )
        slow_cap = getattr(s, "slow_max_length", None)
        rounds = max(1, getattr(s, "rounds", 1) or 1)
        for L in lengths:
            slow_ok = slow_cap is None or L <= slow_cap
            measured: list[dict[str, Any]] = []
            for rnd in range(rounds):  # interleaved: every mode and peer once per round
                for mode in s.modes:
                    if mode == "fallback" and not slow_ok:
                        continue
                    log(f"{spec.name}: {mode} at {L} tokens" + (f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""))
                    row = served_row(dirs[MODE_EXPORTS[mode][2]], mode, spec, L, s, logs)
                    capacity = L + s.new_tokens + 16
                    mfacts = served_facts(facts, dirs[MODE_EXPORTS[mode][2]], weights)
                    b = bandwidth.bytes_per_token(
                        mfacts,
                        "dense" if mode in DENSE_MODES else mode,
                        L,
                        s.topk,
                        s.block_size,
                        s.block_budget,
                        capacity,
                    )
                    row["bytes_per_token"], row["bytes_per_token_split"] = b["total"], b
                    row["weights"] = weights
                    measured.append(row)
                for kind in s.peers if slow_ok else ():
                    log(
                        f"{spec.name}: peer {kind} at {L} tokens"
                        + (f" (round {rnd + 1}/{rounds})" if rounds > 1 else "")
                    )
                    if kind in peer_errors:
                        row = failed_peer_row(kind, spec, L, s, peer_errors[kind])
                    else:
                        row = peer_row(kind, peer_paths[kind], spec, L, s, logs, tokenizer=base / "tokenizer.json")
                    pfacts = peer_facts(kind, facts, peer_paths.get(kind), dirs.get("topk"), weights)
                    b = bandwidth.bytes_per_token(pfacts, "topk" if kind == "ragtop-engine" else "dense", L, s.topk)
                    row["bytes_per_token"], row["bytes_per_token_split"] = b["total"], b
                    measured.append(row)
            rows.extend(combine_rounds(measured))
            _speedups(rows, spec.name, L)
            if bw:
                for r in rows:
                    if r["decode_tokens_per_s"] and r["bytes_per_token"]:
                        r["bandwidth_bound_pct"] = (
                            100 * r["decode_tokens_per_s"] * r["bytes_per_token"] / (bw["read_gbps"] * 1e9)
                        )
            doc = _context_doc(s, started, bw, rows, notes, plugin)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(doc, indent=1))  # after every length: a long run keeps what it measured
        if slow_cap is not None and any(L > slow_cap for L in lengths):
            notes.append(f"{spec.name}: the fallback and the peers ran up to {slow_cap} tokens (--slow-max-length)")
        rows_for = [r for r in rows if r["model"] == spec.name]
        _model_facts_note(facts, spec, notes, rows_for)
    doc = _context_doc(s, started, bw, rows, notes, plugin)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    return doc


def merge_context(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Rows of `new` replace `old`'s rows of the same (model, mode, context); ratios recomputed."""
    key = lambda r: (r["model"], r["mode"], r["context"])  # noqa: E731
    fresh = {key(r) for r in new["rows"]}
    rows = [r for r in old["rows"] if key(r) not in fresh] + new["rows"]
    for model, context in {(r["model"], r["context"]) for r in rows}:
        _speedups(rows, model, context)
    bw = new.get("bandwidth") or old.get("bandwidth")
    for r in rows:
        if bw and r["decode_tokens_per_s"] and r["bytes_per_token"]:
            r["bandwidth_bound_pct"] = 100 * r["decode_tokens_per_s"] * r["bytes_per_token"] / (bw["read_gbps"] * 1e9)
    notes = list(dict.fromkeys(old["notes"] + new["notes"]))
    notes.append(f"merged: rows of `{new['command']}` replaced those of `{old['command']}`")
    return {
        **old,
        "rows": rows,
        "notes": notes,
        "finished_at": new["finished_at"],
        "command": old["command"] + " ; then " + new["command"],
        "merged": [old.get("settings"), new.get("settings")],
    }


def _model_facts_note(facts: dict[str, Any], spec: ModelSpec, notes: list[str], rows: list[dict]) -> None:
    notes.append(
        f"{spec.name}: {facts['weight_bytes'] / 1e6:.1f} MB of fp32 weights, "
        f"{facts['kv_bytes_per_token']} KV-cache bytes per token (all layers, keys + values)"
    )


def _speedups(rows: list[dict[str, Any]], model: str, context: int) -> None:
    same = [r for r in rows if r["model"] == model and r["context"] == context]
    # the faster of the served dense paths at this length
    dense = max(
        (r for r in same if r["mode"] in DENSE_MODES and r["decode_tokens_per_s"]),
        key=lambda r: r["decode_tokens_per_s"],
        default=None,
    )
    for r in same:
        if dense and r["decode_tokens_per_s"]:
            r["speedup_vs_dense"] = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            if r["ttft_s"] and dense["ttft_s"]:
                r["ttft_vs_dense"] = r["ttft_s"] / dense["ttft_s"]
    # the strongest dense path measured at this length: served dense or a peer (no server overhead)
    best = max(
        (r["decode_tokens_per_s"] for r in same if r["mode"] in (*DENSE_MODES, *PEERS) and r["decode_tokens_per_s"]),
        default=None,
    )
    for r in same:
        r["speedup_vs_best_dense"] = r["decode_tokens_per_s"] / best if best and r["decode_tokens_per_s"] else None


def _context_doc(s, started, bw, rows, notes, plugin) -> dict[str, Any]:
    settings = {k: v for k, v in vars(s).items() if k != "func"}
    settings["plugin_library"] = str(plugin) if plugin else None
    return {
        "schema": SCHEMA,
        "kind": "context-sweep",
        "started_at": started,
        "finished_at": time.time(),
        "machine": machine(),
        "command": " ".join(["python -m loadtests"] + sys.argv[1:]),
        "settings": settings,
        "bandwidth": bw,
        "rows": rows,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------------------
# concurrency sweep


def concurrency_sweep(s: argparse.Namespace) -> dict[str, Any]:
    work = Path(s.work_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    started = time.time()
    model = s.model
    if model == "tiny":
        ck = tiny_checkpoint(work / "checkpoints" / "tiny")
        model = str(exported(ck, work / "exports" / "tiny-dense", 256, logs))
    args = ["--log-level", "warning", "--max-batch-size", str(s.max_batch_size), "--max-waiting", str(s.max_waiting)]
    if s.threads:
        args += ["--threads", str(s.threads)]
    args += s.server_arg or []
    levels: list[dict[str, Any]] = []
    first_429 = None
    slos = parse_slos(s.goodput)
    server = ServerProcess(model, args, log_path=logs / "serve-concurrency.log")
    log(f"starting ragtop serve {model or '(default model)'} {' '.join(args)}")
    server.start(timeout=s.start_timeout)
    try:
        runs = [(c, max(s.min_requests, s.requests_per_client * c), s.output_len) for c in s.clients]
        if s.burst:
            runs.append((s.burst, s.burst, s.burst_output_len))
        for i, (clients, n, out_len) in enumerate(runs):
            burst = s.burst and i == len(runs) - 1
            label = f"burst of {clients}" if burst else f"{clients} clients"
            log(f"concurrency: {label}, {n} requests")
            cfg = LoadConfig(
                url=server.url,
                num_requests=n,
                input_len=s.input_len,
                output_len=out_len,
                max_concurrency=None if burst else clients,
                slos=slos,
                warmup=1 if i == 0 else 0,
                progress=s.progress,
                label=label,
                seed=s.seed,
                timeout_s=s.request_timeout,
            )
            doc = asyncio.run(run_load(cfg))
            print(format_summary(doc["summary"], label), file=sys.stderr)
            rejected = [r for r in doc["requests"] if r["status"] == 429]
            level = {
                "clients": clients,
                "burst": bool(burst),
                "num_requests": n,
                "output_len": out_len,
                "summary": doc["summary"],
                "server": doc["server"],
                "retry_after": sorted({r["retry_after"] for r in rejected if r["retry_after"]}),
                "accepted_in_flight": n - len(rejected) if burst else None,
            }
            levels.append(level)
            if rejected and first_429 is None:
                first_429 = clients
        peak = server.peak_rss()
    finally:
        server.stop()
    return {
        "schema": SCHEMA,
        "kind": "concurrency-sweep",
        "started_at": started,
        "finished_at": time.time(),
        "machine": machine(),
        "command": " ".join(["python -m loadtests"] + sys.argv[1:]),
        "settings": {k: v for k, v in vars(s).items() if k != "func"} | {"server_args": args, "model_served": model},
        "levels": levels,
        "first_429_clients": first_429,
        "peak_rss_bytes": peak,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(sub) -> None:
    p = sub.add_parser("context-sweep", help="decode tokens/s, TTFT and memory vs prompt length, every mode")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME=CHECKPOINT:MAX_CONTEXT",
        help=f"repeatable; CHECKPOINT 'smollm2' imports it, 'tiny' makes a random tiny model "
        f"(default: {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--lengths", type=_ints, default=[1024, 4096, 8192, 16384, 32768])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="requests per point (the best is reported)")
    p.add_argument("--modes", type=_names(SERVED_MODES), default=list(SERVED_MODES))
    p.add_argument(
        "--peers",
        type=_names(ALL_PEERS),
        default=list(PEERS),
        help=f"comma-separated, from {', '.join(ALL_PEERS)} (default: {','.join(PEERS)}; "
        "llama.cpp and ort-genai need `make bench-peers`); an empty string: none",
    )
    p.add_argument(
        "--weights",
        choices=["fp32", "fp16", "int8", "int4"],
        default="fp32",
        help="weights of every served mode's export (`ragtop export --weights`; default %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds: every mode and peer runs once per round at each length, the median "
        "round is reported (default %(default)s)",
    )
    p.add_argument(
        "--merge-into",
        default=None,
        help="an earlier context JSON: this run's rows replace its rows of the "
        "same (model, mode, context); the result goes to --out",
    )
    p.add_argument(
        "--slow-max-length",
        type=int,
        default=8192,
        help="the standard-op fallback and the peers run only up to this prompt length (their "
        "prefill is quadratic and unchunked or slow: 32k takes tens of minutes on 2 cores)",
    )
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--block-budget", type=int, default=16)
    p.add_argument("--bandwidth-mb", type=int, default=1024)
    p.add_argument("--no-bandwidth", action="store_true")
    p.add_argument(
        "--prometheus",
        choices=["auto", "off", "require"],
        default="auto",
        help="a real Prometheus when the binary is installed (auto), never, or fail without it",
    )
    _common(p, RESULTS / "context.json")
    p.set_defaults(func=cmd_context)

    p = sub.add_parser("concurrency-sweep", help="throughput and latency vs concurrent clients; where 429 starts")
    p.add_argument(
        "--model",
        help="exported folder or checkpoint (default: ragtop serve's default model; 'tiny' makes a random tiny model)",
    )
    p.add_argument("--clients", type=_ints, default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--burst", type=int, default=128, help="then send this many at once (0: no burst)")
    p.add_argument("--burst-output-len", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-waiting", type=int, default=64)
    p.add_argument("--server-arg", action="append", help="extra `ragtop serve` argument (repeatable)")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=["ttft:2000", "tpot:500"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _common(p, RESULTS / "concurrency.json")
    p.set_defaults(func=cmd_concurrency)


def _common(p, out: Path) -> None:
    p.add_argument("--threads", type=int, help="intra-op threads of every server and peer (default: all cores)")
    p.add_argument("--work-dir", default="build/bench", help="checkpoints, exports and logs (default %(default)s)")
    p.add_argument("--out", default=str(out), help="result JSON (default %(default)s)")
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--request-timeout", type=float, default=3600.0)
    p.add_argument("--quick", action="store_true", help="a smoke run: a random tiny model, tiny lengths, minutes")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return names

    return parse


def cmd_context(a: argparse.Namespace) -> int:
    if a.quick:
        a.models = a.models or ["tiny=tiny:256"]
        a.lengths, a.new_tokens, a.repeats = [32, 96], 8, 1
        a.topk, a.block_size, a.block_budget = 16, 16, 2
        a.bandwidth_mb = min(a.bandwidth_mb, 64)
        a.threads = a.threads or 1
        if a.out == str(RESULTS / "context.json"):
            a.out = str(Path(a.work_dir) / "quick-context.json")
    a.models = a.models or list(DEFAULT_MODELS)
    doc = context_sweep(a)
    if a.merge_into:
        doc = merge_context(json.loads(Path(a.merge_into).read_text()), doc)
        Path(a.out).write_text(json.dumps(doc, indent=1))
    print(format_context(doc))
    log(f"wrote {a.out}")
    return 0 if any(r["ok"] for r in doc["rows"]) else 1


def cmd_concurrency(a: argparse.Namespace) -> int:
    if a.quick:
        a.model = a.model or "tiny"
        a.clients, a.requests_per_client, a.min_requests = [1, 2, 4], 1, 2
        a.input_len, a.output_len, a.burst, a.burst_output_len = 16, 8, 8, 4
        a.max_batch_size, a.max_waiting = 2, 2
        a.threads = a.threads or 1
        if a.out == str(RESULTS / "concurrency.json"):
            a.out = str(Path(a.work_dir) / "quick-concurrency.json")
    doc = concurrency_sweep(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    log(f"wrote {a.out}; first 429 at {doc['first_429_clients']}")
    return 0


def format_context(doc: dict[str, Any]) -> str:
    lines = [
        f"{'model':<10}{'mode':<14}{'context':>8}{'decode tok/s':>14}{'TTFT s':>9}{'peak RSS MB':>13}"
        f"{'x dense':>9}{'% bound':>9}{'server tok/s':>14}"
    ]

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for r in doc["rows"]:
        lines.append(
            f"{r['model']:<10}{r['mode']:<14}{r['context']:>8}{f(r['decode_tokens_per_s'], '.2f'):>14}"
            f"{f(r['ttft_s'], '.3f'):>9}{f(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 1e6, '.0f'):>13}"
            f"{f(r['speedup_vs_dense'], '.2f'):>9}{f(r['bandwidth_bound_pct'], '.1f'):>9}"
            f"{f(r['server_decode_tokens_per_s'], '.2f'):>14}" + ("" if r["ok"] else f"  {r['error'][:60]}")
        )
    return "\n".join(lines + [f"note: {n}" for n in doc["notes"]])
