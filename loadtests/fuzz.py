"""`python -m loadtests fuzz`: schemathesis against a real `ragtop serve`, asserting no 5xx.

schemathesis reads the server's own OpenAPI document and sends generated requests to every
operation: valid bodies, and (mode `all`) bodies that break the schema — wrong types, values
out of range, missing fields, odd strings. The run passes when no response is a 5xx
(`not_a_server_error`), every status is one the document lists (`status_code_conformance`),
and afterwards the server still answers a completion and exits 0 on SIGTERM.

Without --model it serves a tiny model it builds itself (random weights, a BPE tokenizer
trained on a few sentences, exported to ONNX with ragtop's custom ops): a fuzz run tests the
server, not the model, and a tiny model answers in milliseconds.

    python -m loadtests fuzz --examples 5000            # make fuzz: >= 5,000 per operation
    python -m loadtests fuzz --examples 60 --seed 1     # the bounded run in make test
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .server import ServerProcess

CHECKS = "not_a_server_error,status_code_conformance"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "State of the Union: the economy, the budget and the people.",
    "Unicode: café, naïve, 日本語のテキスト, emoji 🚀 and more.",
    "Numbers 1234567890 and punctuation !?;:,.",
]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}" + EOS + "{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}" + EOS + "assistant\n{% endif %}"
)


def build_tiny_model(root: Path, context: int = 96) -> Path:
    """A tiny top-k model exported to ONNX (seconds): what a server fuzz run needs."""
    import torch

    from ragtop.checkpoint import save_checkpoint
    from ragtop.cli import main as ragtop_main
    from ragtop.model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer
    from ragtop.train.tokenizer import train_bpe

    tok = train_bpe(TEXTS * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=context,
        attention=AttentionConfig(kind="topk", topk=8),
        embedding=EmbeddingConfig(),
    )
    eos = tok.token_to_id(EOS)
    ckpt = save_checkpoint(
        root / "ckpt",
        Transformer(cfg).eval(),
        tok.to_str(),
        generation={"bos_token_id": eos, "eos_token_id": eos, "chat_template": CHAT_TEMPLATE},
    )
    out = root / "onnx"
    if ragtop_main(["export", str(ckpt), str(out), "--no-validate", "--overwrite"]) != 0:
        raise RuntimeError("exporting the tiny model failed")
    return out


def schemathesis_command(url: str, examples: int, seed: int, workers: int, report: Path | None) -> list[str]:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        raise RuntimeError("schemathesis is not installed (pip install -e '.[test]')")
    cmd = [
        st,
        "run",
        f"{url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--workers",
        str(workers),
        "--no-color",
        "--request-timeout",
        "60",
        "--phases",
        "examples,coverage,fuzzing",
        "--suppress-health-check",
        "all",
        "--generation-database",
        "none",
    ]
    if report is not None:
        cmd += ["--report", "ndjson", "--report-ndjson-path", str(report)]
    return cmd


def count_requests(report: Path) -> dict[str, int]:
    """Requests sent per operation, from schemathesis's ndjson event stream."""
    counts: dict[str, int] = {}
    if not report.exists():
        return counts
    for line in report.read_text().splitlines():
        for label in re.findall(r'"label": ?"((?:GET|POST) [^"]+)"', line):
            counts[label] = counts.get(label, 0)
        for m in re.finditer(r'"method": ?"(GET|POST)", ?"uri": ?"https?://[^/]+(/[^"?]*)', line):
            key = f"{m.group(1)} {m.group(2)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def still_serves(url: str) -> str:
    r = httpx.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 4, "ignore_eos": True}, timeout=60)
    r.raise_for_status()
    if r.json()["usage"]["completion_tokens"] != 4:
        raise RuntimeError(f"the server answered oddly after fuzzing: {r.text}")
    return r.json()["choices"][0]["text"]


def run_fuzz(
    model: Path | None, examples: int, seed: int, workers: int, out_dir: Path | None = None, threads: int = 1
) -> dict:
    """Serve, fuzz, check the server afterwards, stop it; a result document."""
    tmp = Path(tempfile.mkdtemp(prefix="ragtop-fuzz-"))
    out_dir = out_dir or tmp
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.monotonic()
        model = model or build_tiny_model(tmp)
        server = ServerProcess(
            model, ["--threads", str(threads), "--served-model-name", "fuzz"], log_path=out_dir / "server.log"
        ).start()
        try:
            report = out_dir / "schemathesis.ndjson"
            cmd = schemathesis_command(server.url, examples, seed, workers, report)
            t1 = time.monotonic()
            st = subprocess.run(cmd, capture_output=True, text=True)
            fuzz_s = time.monotonic() - t1
            (out_dir / "schemathesis.txt").write_text(st.stdout + st.stderr)
            answer = still_serves(server.url)
            health = httpx.get(server.url + "/health").json()
        finally:
            exit_code = server.stop()
        log = (out_dir / "server.log").read_text(errors="replace")
        counts = count_requests(report)
        return {
            "command": " ".join(cmd),
            "examples_per_operation": examples,
            "seed": seed,
            "workers": workers,
            "schemathesis_exit": st.returncode,
            "summary": _summary(st.stdout),
            "requests_by_operation": counts,
            "requests_total": sum(counts.values()),
            "fuzz_seconds": round(fuzz_s, 1),
            "total_seconds": round(time.monotonic() - t0, 1),
            "answer_after": answer,
            "health_after": health,
            "server_exit_code": exit_code,
            "server_tracebacks": log.count("Traceback"),
            "ok": st.returncode == 0 and exit_code == 0,
            "output_tail": (st.stdout + st.stderr)[-3000:],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _summary(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if re.search(r"\b(passed|failed|errors?|skipped)\b", line)]
    return lines[-1].strip() if lines else ""


def add_arguments(sub) -> None:
    p = sub.add_parser("fuzz", help="schemathesis against a real ragtop serve: no 5xx, still serving afterwards")
    p.add_argument("--model", type=Path, help="exported model folder (default: a tiny model built for the run)")
    p.add_argument("--examples", type=int, default=5000, help="generated requests per operation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="the server's intra-op threads")
    p.add_argument("--out", type=Path, default=Path("build/fuzz"), help="logs and reports (default %(default)s)")
    p.add_argument("--json", type=Path, help="write the result document here")
    p.set_defaults(func=cmd_fuzz)


def cmd_fuzz(a: argparse.Namespace) -> int:
    doc = run_fuzz(a.model, a.examples, a.seed, a.workers, a.out, a.threads)
    print(doc["output_tail"])
    print(
        f"requests sent: {doc['requests_total']} in {doc['fuzz_seconds']} s; by operation: "
        + ", ".join(f"{k} {v}" for k, v in sorted(doc["requests_by_operation"].items()))
    )
    print(
        f"schemathesis exit {doc['schemathesis_exit']}; after the run the server answered {doc['answer_after']!r}, "
        f"health {doc['health_after']['status']}; SIGTERM exit {doc['server_exit_code']}; "
        f"tracebacks in the server log: {doc['server_tracebacks']}"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({k: v for k, v in doc.items() if k != "output_tail"}, indent=1))
    return 0 if doc["ok"] else 1
