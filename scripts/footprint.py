"""The memory footprint of `ragtop serve` (docs/server.md, "Footprint").

For each model (an exported folder; `--tiny` adds a tiny model exported here) it starts
`ragtop serve MODEL` twice as a subprocess: once as the CLI runs it (torch installed but
never imported: what a base install without torch holds), once with `import torch` first (what
a process that loads torch holds, e.g. the torch runner's). It reports:

- idle RSS: VmRSS once /health says ready and the server has sat idle for a moment;
- with `--context N`: the peak RSS (VmHWM) after one request whose prompt fills N tokens,
  against the model's weights (the size of its .onnx files) plus its KV cache (the engine's
  cache plan, one slot: `--max-batch-size 1 --context-limit N`).

Whether torch is in the process is read from /proc/PID/maps (libtorch mapped or not), not
assumed. RSS does not depend on the machine's load, so a busy machine measures it correctly.

    python scripts/footprint.py /work/models/top256-int4 --tiny --context 8192 --json build/footprint.json
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RUN_CLI = "import sys; from ragtop.cli import main; sys.exit(main(sys.argv[1:]))"
RUN_CLI_WITH_TORCH = "import torch; " + RUN_CLI
CACHE_LINE = re.compile(r"KV cache ([0-9.]+) MiB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def has_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def weights_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.iterdir() if p.suffix in (".onnx", ".data", ".bin"))


def tiny_model(root: Path) -> Path:
    """A tiny top-k model (2 layers, d_model 64), exported without validation (needs the train extra)."""
    import torch

    from ragtop.checkpoint import save_checkpoint
    from ragtop.cli import main
    from ragtop.model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer
    from ragtop.train.tokenizer import train_bpe

    tok = train_bpe(["The quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_seq_len=2048,
        attention=AttentionConfig(kind="topk", topk=32),
        embedding=EmbeddingConfig(),
    )
    ckpt = save_checkpoint(root / "tiny-ckpt", Transformer(cfg).eval(), tok.to_str(), generation={"bos_token_id": 0})
    if main(["export", str(ckpt), str(root / "tiny"), "--no-validate"]) != 0:
        raise SystemExit("exporting the tiny model failed")
    return root / "tiny"


def measure(model: Path, with_torch: bool, context: int | None, threads: int) -> dict:
    """Start `ragtop serve MODEL`, read its RSS idle (and after one full-context request)."""
    port = free_port()
    args = [
        "serve",
        str(model),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--log-level",
        "info",
        "--max-batch-size",
        "1",
    ]
    if context:
        args += ["--context-limit", str(context)]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_CLI_WITH_TORCH if with_torch else RUN_CLI, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        time.sleep(3)  # idle: the loader thread has finished, nothing is running
        row = {
            "model": str(model),
            "torch_imported": has_torch(proc.pid),
            "weights_mb": weights_bytes(model) / 2**20,
            "idle_rss_mb": proc_status(proc.pid)["VmRSS"] / 2**20,
        }
        if context:
            row.update(full_context_request(proc.pid, url, context))
            log.seek(0)
            cache = CACHE_LINE.search(log.read())
            row["cache_mb"] = float(cache.group(1)) if cache else None
            if row["cache_mb"]:
                row["peak_over_weights_cache"] = row["peak_rss_mb"] / (row["weights_mb"] + row["cache_mb"])
        return row
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ragtop serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("ragtop serve did not become ready")


def full_context_request(pid: int, url: str, context: int, new_tokens: int = 8) -> dict:
    """One completion whose prompt (token ids) plus output fills `context` tokens; the peak RSS after it."""
    ids = httpx.post(
        url + "/tokenize",
        json={"prompt": "The quick brown fox jumps over the lazy dog. " * 50, "add_special_tokens": False},
    ).json()["tokens"]
    prompt = (ids * (context // len(ids) + 1))[: context - new_tokens]
    r = httpx.post(
        url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0},
        timeout=1800,
    )
    r.raise_for_status()
    return {"context": context, "peak_rss_mb": proc_status(pid)["VmHWM"] / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", type=Path, nargs="*", help="exported folders (model.onnx)")
    p.add_argument("--tiny", action="store_true", help="also a tiny model exported here (needs the train extra)")
    p.add_argument("--context", type=int, default=None, help="also the peak RSS after one request of this many tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the rows here too")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = list(a.models) + ([tiny_model(Path(tmp))] if a.tiny else [])
        rows = []
        for model in models:
            for with_torch in (False, True):
                context = a.context if model.name != "tiny" else None
                rows.append(measure(model, with_torch, context, a.threads))
                print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
