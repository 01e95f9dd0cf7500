"""Peers on the same weights, outside ragtop's server: each runs in its own process
(`python -m loadtests peer KIND ...`) so that its peak resident memory is its own.

- `transformers`: a LlamaForCausalLM holding the checkpoint's weights
  (`ragtop.runtime.bench.to_hf_llama`; dense + uniform models only), `generate` on CPU with
  SDPA attention (the strongest stock transformers path on CPU; eager attention would
  materialise a T x T score matrix per head at long prompts), greedy, a streamer timing
  every token.
- `stock-ort`: the `--ops standard` export (no custom ops) on a plain onnxruntime session
  without the plugin, driven the best way a stock runtime allows: preallocated cache buffers
  bound as both past and present (IO binding, updated in place), prefill in chunks.

Both print (and write with --json) {"ttft_s", "decode_tokens_per_s", "peak_rss_bytes", ...}:
TTFT = prompt in -> first new token; decode tokens/s = (new tokens - 1) / (last - first).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from .workload import BASE_TEXT, tile


def prompt_ids(tokenizer_json: Path, length: int) -> list[int]:
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(tokenizer_json)).encode(BASE_TEXT, add_special_tokens=False).ids
    return tile(base, length)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across
    fork + exec, so a peer started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def run_transformers(checkpoint: Path, context: int, new_tokens: int, threads: int | None) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from ragtop.checkpoint import load_checkpoint
    from ragtop.runtime.bench import to_hf_llama

    if threads:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    c = ckpt.model.config
    if c.attention.kind != "dense" or c.embedding.kind != "uniform":
        raise SystemExit(f"transformers peer: {checkpoint} is {c.attention.kind}/{c.embedding.kind}; "
                         "only dense + uniform models have a transformers twin")
    hf = to_hf_llama(ckpt.model)
    hf.config.max_position_embeddings = max(hf.config.max_position_embeddings, context + new_tokens)
    attn = "sdpa"
    try:
        hf.set_attn_implementation("sdpa")
    except (AttributeError, ValueError, ImportError):
        attn = "eager"
    ids = torch.tensor([prompt_ids(checkpoint / "tokenizer.json", context)])

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.calls = 0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls > 1:  # the first call is the prompt
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    with torch.inference_mode():
        hf.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        clock = Clock()
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, streamer=clock)
    assert out.shape[1] == context + new_tokens
    t = clock.times
    return {"peer": "transformers", "attention_implementation": attn, "context": context,
            "new_tokens": new_tokens, "ttft_s": t[0] - t0,
            "decode_tokens_per_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None,
            "peak_rss_bytes": peak_rss(), "threads": torch.get_num_threads(),
            "transformers": __import__("transformers").__version__}


def run_stock_ort(export_dir: Path, context: int, new_tokens: int, threads: int | None,
                  prefill_chunk: int = 256) -> dict[str, Any]:
    import onnxruntime as ort

    g = json.loads((export_dir / "genai_config.json").read_text())
    dec, rt = g["model"]["decoder"], g["ragtop"]
    if rt.get("custom_ops"):
        raise SystemExit(f"stock-ort peer: {export_dir} has custom ops; export it with --ops standard")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(export_dir / dec["filename"]), so, providers=["CPUExecutionProvider"])
    capacity = context + new_tokens
    mult = int(rt["kv_cache"].get("capacity_multiple") or 1)
    capacity = -(-capacity // mult) * mult
    n, hkv, dh = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    dtype = np.float16 if dec.get("dtype") == "fp16" else np.float32
    names_in, names_out = dec["inputs"], dec["outputs"]
    buffers = []
    for i in range(n):
        for kin, kout in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names")):
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, hkv, capacity, dh), dtype=dtype))
            buffers.append((names_in[kin] % i, names_out[kout] % i, buf))
    length = 0

    def step(ids: list[int]) -> int:
        nonlocal length
        io = sess.io_binding()
        io.bind_cpu_input(names_in["input_ids"], np.array([ids], dtype=np.int64))
        io.bind_cpu_input(names_in["past_lengths"], np.array([length], dtype=np.int64))
        io.bind_cpu_input(names_in["logits_indices"], np.array([[len(ids) - 1]], dtype=np.int64))
        io.bind_output(names_out["logits"])
        for past, present, buf in buffers:
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)
        sess.run_with_iobinding(io)
        length += len(ids)
        return int(io.get_outputs()[0].numpy()[0, -1].argmax())

    prompt = prompt_ids(export_dir / "tokenizer.json", context)
    step(prompt[:8])  # warm-up (then overwritten: positions restart at 0)
    length = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompt), prefill_chunk):
        tok = step(prompt[s:s + prefill_chunk])
    times = [time.perf_counter()]
    for _ in range(new_tokens - 1):
        tok = step([tok])
        times.append(time.perf_counter())
    return {"peer": "stock-ort", "context": context, "new_tokens": new_tokens, "ttft_s": times[0] - t0,
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
            "peak_rss_bytes": peak_rss(), "capacity": capacity, "prefill_chunk": prefill_chunk,
            "threads": threads, "onnxruntime": ort.__version__}


def add_arguments(sub) -> None:
    p = sub.add_parser("peer", help="one peer measurement in this process (used by context-sweep)")
    p.add_argument("kind", choices=["transformers", "stock-ort"])
    p.add_argument("path", type=Path, help="checkpoint (transformers) or --ops standard export (stock-ort)")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    fn = run_transformers if a.kind == "transformers" else run_stock_ort
    r = fn(a.path, a.context, a.new_tokens, a.threads)
    text = json.dumps(r, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)
    return 0
