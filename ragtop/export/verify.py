"""Validate an exported graph against PyTorch with a stock onnxruntime (no plugin).

Cases (each compares logits and every present.* output, max abs difference); L is long
enough that top-k / block selection really drop keys (`selecting_length`):
  prefill       B=1, L tokens, empty cache, logits at every position (the evaluation path,
                against the model's plain causal forward)
  decode        one token on top of that prefill, last-position logits
  mixed_batch   B=3, caches holding 0 / 3 / L-1 tokens (junk beyond), 4 new tokens each
  empty_batch   B=2, empty caches, up to 7 tokens, last-position logits only
Then a greedy decode of `greedy_tokens` tokens through the cached path, the way the
runtime drives it: one preallocated buffer per cache tensor, bound as both past and present
(IO binding), must produce exactly PyTorch's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from ..model import KVCache, Transformer
from .onnx import ExportSpec


def block_summaries(keys: Tensor, lengths: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Element-wise min/max of each block's written keys (j < lengths[b]); 0 for blocks
    holding none. keys [B,Hkv,C,Dh] -> 2 x [B,Hkv,C/bs,Dh]."""
    B, Hkv, C, Dh = keys.shape
    written = torch.arange(C)[None, :] < lengths[:, None]  # [B,C]
    kb = keys.view(B, Hkv, C // block_size, block_size, Dh)
    w = written.view(B, 1, C // block_size, block_size, 1)
    kmin = torch.where(w, kb, torch.inf).amin(3)
    kmax = torch.where(w, kb, -torch.inf).amax(3)
    any_w = w.any(3)
    return kmin.where(any_w, 0.0), kmax.where(any_w, 0.0)


def round_capacity(n: int, spec: ExportSpec) -> int:
    """Smallest capacity >= n that the graph accepts (a multiple of the block size)."""
    bs = spec.block_size or 1
    return -(-n // bs) * bs


def session(path, providers=("CPUExecutionProvider",), custom_op_library: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom_op_library:
        so.register_custom_ops_library(custom_op_library)
    return ort.InferenceSession(str(path), so, providers=list(providers))


def np_dtype(spec: ExportSpec):
    """The activations' type (and the block summaries')."""
    return np.float16 if spec.dtype == "fp16" else np.float32


def kv_np_dtype(spec: ExportSpec):
    """The key/value cache's type (--kv-dtype)."""
    return np.float16 if spec.kv_dtype == "fp16" else np.float32


def reference_cache(model: Transformer, spec: ExportSpec, batch: int, capacity: int) -> KVCache:
    """A PyTorch cache that stores what the graph's cache stores: with --kv-dtype fp16 the
    reference rounds its keys/values to float16 when writing them (model/attention.py
    write_cache), so block selection sees the same stored keys."""
    kv = torch.float16 if spec.kv_dtype == "fp16" and spec.dtype != "fp16" else torch.float32
    return KVCache.allocate(model.config, batch, capacity, dtype=kv)


def onnx_feeds(spec: ExportSpec, ids: Tensor, cache: KVCache, logits_indices: Tensor) -> dict[str, np.ndarray]:
    """Inputs for one call on top of `cache` (a torch KVCache; summaries derived from it)."""
    dt = np_dtype(spec)
    feeds = {"input_ids": ids.numpy(), "past_lengths": cache.lengths.numpy(), "logits_indices": logits_indices.numpy()}
    for i in range(spec.n_layers):
        feeds[f"past_key_values.{i}.key"] = cache.keys[i].numpy().astype(kv_np_dtype(spec))
        feeds[f"past_key_values.{i}.value"] = cache.values[i].numpy().astype(kv_np_dtype(spec))
        if spec.attention_mode == "block":
            kmin, kmax = block_summaries(cache.keys[i], cache.lengths, spec.block_size)
            feeds[f"past_key_values.{i}.key_min"] = kmin.numpy().astype(dt)
            feeds[f"past_key_values.{i}.key_max"] = kmax.numpy().astype(dt)
    return feeds


def clone_cache(cache: KVCache) -> KVCache:
    return KVCache([k.clone() for k in cache.keys], [v.clone() for v in cache.values], cache.lengths.clone())


@dataclass
class CaseResult:
    name: str
    shape: str
    max_abs_diff: dict[str, float]
    passed: bool
    tolerance: dict[str, float] = field(default_factory=dict)  # atol + rtol * max|reference| per output


def compare_case(
    model: Transformer,
    sess: ort.InferenceSession,
    spec: ExportSpec,
    name: str,
    ids: Tensor,
    cache: KVCache,
    logits_indices: Tensor,
    atol: float,
    reference: Tensor | None = None,
    rtol: float = 0.0,
) -> CaseResult:
    feeds = onnx_feeds(spec, ids, cache, logits_indices)
    outs = dict(zip(spec.output_names(), sess.run(None, feeds), strict=True))
    after = clone_cache(cache)
    B, K = logits_indices.shape
    with torch.no_grad():  # (with a reference, only the cache update is needed: no [B,S,V] logits)
        full = model(ids, cache=after, last_only=reference is not None)
    if reference is not None:
        want = reference  # already at logits_indices: [B,K,V]
    else:
        want = full.gather(1, logits_indices[:, :, None].expand(B, K, full.shape[-1]))
    del full
    diffs = {"logits": float(np.abs(outs["logits"].astype(np.float32) - want.numpy()).max())}
    tol = {"logits": atol + rtol * float(want.abs().max())}
    # a float16 cache may round a key to the neighbouring float16 when the graph's fp32 key
    # differs from PyTorch's by ~1e-6: allow one float16 step (2^-10 relative) on the stored
    # keys/values and on the summaries (bounds of the stored keys)
    kv_rtol = max(rtol, 2.0**-10) if spec.kv_dtype == "fp16" and spec.dtype != "fp16" else rtol
    for kind in spec.cache_names:
        d, scale = 0.0, 0.0
        for i in range(spec.n_layers):
            got = outs[f"present.{i}.{kind}"].astype(np.float32)
            if kind in ("key", "value"):
                ref = (after.keys if kind == "key" else after.values)[i].float()
            else:  # summaries of the updated cache
                ref = block_summaries(after.keys[i].float(), after.lengths, spec.block_size)[kind == "key_max"]
            d = max(d, float(np.abs(got - ref.numpy()).max()))
            scale = max(scale, float(ref.abs().max()))
        diffs[f"present.*.{kind}"] = d
        tol[f"present.*.{kind}"] = atol + kv_rtol * scale
    shape = f"B={ids.shape[0]} S={ids.shape[1]} C={cache.capacity} past={cache.lengths.tolist()} K={K}"
    return CaseResult(name, shape, diffs, all(diffs[k] <= tol[k] for k in diffs), tol)


def selecting_length(spec: ExportSpec) -> int:
    """A sequence length at which top-k (and block) selection really drop keys: more than
    topk visible keys (unless top-k cannot bind: every key of the chosen blocks), more than
    block_budget + 1 blocks (bounded by the context limit). With a budget per layer, more
    than the median layer's: the layers of larger budgets then keep every key of this
    prompt (still checked, as dense), and the prompt stays short enough for the standard-op
    bodies, whose prefill memory grows with length x context (~6 GB at 2k tokens)."""
    need = 9 if spec.attention_mode == "dense" else spec.topk + 4
    if spec.attention_mode == "block":
        budgets = sorted(spec.layer_budgets) or [spec.block_budget]
        blocks = spec.block_size * (budgets[len(budgets) // 2] + 2) + 1
        quest = spec.topk >= (spec.block_budget + 1) * spec.block_size  # top-k never binds
        need = blocks if quest else max(need, blocks)
    return max(2, min(need, spec.context_limit - 4))


PREFILL_POSITIONS = 1024


def prefill_positions(length: int) -> Tensor:
    """The prefill case's checked positions: every one up to PREFILL_POSITIONS, else evenly
    spaced ones plus the last 64 (where selection drops the most keys)."""
    if length <= PREFILL_POSITIONS:
        return torch.arange(length)
    spaced = torch.linspace(0, length - 1, PREFILL_POSITIONS - 64).long()
    return torch.unique(torch.cat([spaced, torch.arange(length - 64, length)]))


def run_cases(
    model: Transformer, sess: ort.InferenceSession, spec: ExportSpec, atol: float, seed: int = 0, rtol: float = 0.0
) -> list[CaseResult]:
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    long = selecting_length(spec)
    S = max(2, min(7, long))
    C = round_capacity(long + 4, spec)
    results = []
    # prefill from an empty cache against the plain causal forward (or, with a float16 cache,
    # the cached forward: the graph attends to the rounded keys it stored); the logits of at
    # most PREFILL_POSITIONS positions (all of them up to that length), so a long selecting
    # length does not hold several [S, vocab] float tensors at once
    ids = torch.randint(0, V, (1, long), generator=g)
    cache = reference_cache(model, spec, 1, C)
    positions = prefill_positions(long)
    with torch.no_grad():
        full = model(ids, cache=clone_cache(cache)) if cache.keys[0].dtype == torch.float16 else model(ids)
        reference = full[:, positions].clone()
        del full
    results.append(
        compare_case(model, sess, spec, "prefill", ids, cache, positions[None], atol, reference=reference, rtol=rtol)
    )
    # one decode step on top of it
    with torch.no_grad():
        model(ids, cache=cache)
    nxt = torch.randint(0, V, (1, 1), generator=g)
    results.append(
        compare_case(model, sess, spec, "decode", nxt, cache, torch.zeros(1, 1, dtype=torch.long), atol, rtol=rtol)
    )
    # a batch of sequences at different lengths (cache slots beyond a length hold junk)
    cache = reference_cache(model, spec, 3, C)
    for t in cache.keys + cache.values:
        t.normal_(generator=g)
    cache.lengths = torch.tensor([0, min(3, long - 1), long - 1])
    ids = torch.randint(0, V, (3, 4), generator=g)
    results.append(
        compare_case(model, sess, spec, "mixed_batch", ids, cache, torch.arange(4).repeat(3, 1), atol, rtol=rtol)
    )
    # empty caches, batch of two, last position only
    cache = reference_cache(model, spec, 2, C)
    ids = torch.randint(0, V, (2, S), generator=g)
    results.append(
        compare_case(model, sess, spec, "empty_batch", ids, cache, torch.full((2, 1), S - 1), atol, rtol=rtol)
    )
    return results


class SharedCacheRunner:
    """Drives the graph the way the runtime does: one preallocated OrtValue per cache
    tensor, bound both as past_key_values.* and as present.* so nothing is copied."""

    def __init__(self, sess: ort.InferenceSession, spec: ExportSpec, batch: int, capacity: int) -> None:
        self.sess, self.spec = sess, spec
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.buffers: dict[str, ort.OrtValue] = {}
        for i in range(spec.n_layers):
            for kind in spec.cache_names:
                slots = capacity // spec.block_size if kind.startswith("key_m") else capacity
                shape = (batch, spec.n_kv_heads, slots, spec.head_dim)
                dt = kv_np_dtype(spec) if kind in ("key", "value") else np_dtype(spec)
                self.buffers[f"{i}.{kind}"] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dt))

    def step(self, ids: np.ndarray, last_only: bool = True) -> np.ndarray:
        """ids [B,S] -> logits [B,1 or S,V]; the cache advances by S for every sequence."""
        B, S = ids.shape
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("past_lengths", self.lengths)
        keep = np.full((B, 1), S - 1) if last_only else np.tile(np.arange(S), (B, 1))
        io.bind_cpu_input("logits_indices", keep.astype(np.int64))
        io.bind_output("logits")  # the first bound output
        for key, buf in self.buffers.items():
            i, kind = key.split(".")
            io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
            io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        self.sess.run_with_iobinding(io)
        self.lengths = self.lengths + S
        # only the logits: copy_outputs_to_cpu() would also copy every cache buffer
        return io.get_outputs()[0].numpy()


def greedy_torch(
    model: Transformer, prompt: list[int], n: int, capacity: int, cache_dtype: torch.dtype = torch.float32
) -> list[int]:
    cache = KVCache.allocate(model.config, 1, capacity, dtype=cache_dtype)
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(ids, cache=cache, last_only=True)[0, -1].argmax())
            out.append(tok)
            ids = torch.tensor([[tok]])
    return out


def greedy_onnx(sess: ort.InferenceSession, spec: ExportSpec, prompt: list[int], n: int, capacity: int) -> list[int]:
    runner = SharedCacheRunner(sess, spec, 1, capacity)
    ids, out = np.array([prompt]), []
    for _ in range(n):
        tok = int(runner.step(ids)[0, -1].argmax())
        out.append(tok)
        ids = np.array([[tok]])
    return out


@dataclass
class Validation:
    atol: float
    cases: list[CaseResult]
    greedy_prompt: list[int]
    greedy_torch: list[int]
    greedy_onnx: list[int]
    greedy_match: bool
    seconds: float
    rtol: float = 0.0
    # checks reported but not gating: case names, and "greedy" (see commands.validate_export)
    informational: tuple[str, ...] = ()
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        gated = [c.passed for c in self.cases if c.name not in self.informational]
        self.passed = all(gated) and (self.greedy_match or "greedy" in self.informational)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        kinds = list(self.cases[0].max_abs_diff)
        head = f"{'case':<12} {'shape':<44} " + " ".join(f"{k:>16}" for k in kinds) + "  ok"
        rows = [head]
        for c in self.cases:
            rows.append(
                f"{c.name:<12} {c.shape:<44} "
                + " ".join(f"{c.max_abs_diff[k]:>16.2e}" for k in kinds)
                + f"  {'yes' if c.passed else 'NO'}"
                + (" (not gating)" if c.name in self.informational else "")
            )
        n_same = sum(a == b for a, b in zip(self.greedy_torch, self.greedy_onnx, strict=True))
        rows.append(
            f"greedy decode, {len(self.greedy_torch)} tokens through the shared cache: "
            f"{n_same}/{len(self.greedy_torch)} match PyTorch ({'ok' if self.greedy_match else 'MISMATCH'})"
            + (" (not gating)" if "greedy" in self.informational else "")
        )
        return "\n".join(rows)


def validate(
    model: Transformer,
    sess: ort.InferenceSession,
    spec: ExportSpec,
    atol: float,
    prompt: list[int],
    greedy_tokens: int = 32,
    log: Callable[[str], None] = lambda s: None,
    rtol: float = 0.0,
    informational: tuple[str, ...] = (),
) -> Validation:
    """Compare the graph in `sess` with `model` (fp32, eval) on several shapes and a greedy decode.
    Each output passes when max|onnx - torch| <= atol + rtol * max|torch| (the logits of a deep
    fp32 decoder differ from PyTorch's by an amount that grows with their own size)."""
    t0 = time.perf_counter()
    log("validating: prefill / decode / mixed-length batch / empty cache")
    cases = run_cases(model, sess, spec, atol, rtol=rtol)
    log(f"validating: greedy decode of {greedy_tokens} tokens through the shared cache")
    capacity = round_capacity(len(prompt) + greedy_tokens, spec)
    want = greedy_torch(model, prompt, greedy_tokens, capacity, reference_cache(model, spec, 1, 1).keys[0].dtype)
    got = greedy_onnx(sess, spec, prompt, greedy_tokens, capacity)
    return Validation(
        atol, cases, list(prompt), want, got, want == got, round(time.perf_counter() - t0, 2), rtol, informational
    )
