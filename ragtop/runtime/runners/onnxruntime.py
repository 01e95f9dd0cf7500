"""OrtRunner: an exported folder (model.onnx + genai_config.json) in an onnxruntime session.

The cache is one preallocated numpy array per layer and kind ([slots, Hkv, C, Dh] for
key/value, [slots, Hkv, C/bs, Dh] for block summaries). A call binds a contiguous slot range
of each buffer by pointer as both `past_key_values.{i}.*` and `present.{i}.*` (IO binding):
the graph (or the ragtop plugin kernel) writes the new positions in place and nothing is
copied. The ragtop plugin library is registered when it is built; otherwise the standard-op
function bodies inside the file run (same results, slower). No torch: this runner is the
whole serving path of an exported model.

Paged mode (`paged=True`, a folder with the graph `ragtop export --paged-kv` writes): the
cache is a pool of pages per layer and kind ([num_pages, Hkv, P, Dh], summaries
[num_pages, Hkv, P/bs, Dh]), bound once; each call feeds a block table [B, max_pages] built
from the engine's per-slot tables (`block_tables`, owned by kv_cache.PagedKVCacheManager).
A call holds exactly its chunks (no slot range, so no idle rows and no garbage writes).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import RagtopError
from .base import Chunk, RunnerSpec, group_chunks, round_up, slot_range

GENAI_CONFIG = "genai_config.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


def ort_value(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


def contiguous_runs(slots: Sequence[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]] (slots sorted)."""
    runs: list[list[int]] = []
    for s in sorted(slots):
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


class OrtRunner:
    def __init__(
        self,
        folder: Path,
        threads: int | None = None,
        use_plugin: bool = True,
        model_file: str | None = None,
        paged: bool = False,
    ) -> None:
        """model_file: another graph of the folder with the same interface (e.g. the export's
        model.int8.onnx); default genai_config's decoder file (its paged graph when `paged`)."""
        import onnxruntime as ort

        folder = Path(folder)
        try:
            self.genai: dict[str, Any] = json.loads((folder / GENAI_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RagtopError(f"{folder} is not a ragtop export: cannot read {GENAI_CONFIG} ({e})") from None
        m, rt = self.genai["model"], self.genai["ragtop"]
        dec = m["decoder"]
        self.io_names, self.out_names = dec["inputs"], dec["outputs"]
        self.n_layers, self.n_kv_heads, self.head_dim = (
            dec["num_hidden_layers"],
            dec["num_key_value_heads"],
            dec["head_size"],
        )
        self.np_dtype = DTYPES[rt["kv_cache"]["dtype"]]  # keys and values
        # block summaries: the activations' type (float32 under a float16 cache; files written
        # before summary_dtype existed keep one type for every cache tensor)
        self.summary_dtype = DTYPES[rt["kv_cache"].get("summary_dtype") or rt["kv_cache"]["dtype"]]
        att = rt["attention"]
        self.block_size = int(att.get("block_size") or 0)
        self.kinds = ["key", "value"] + (["key_min", "key_max"] if self.block_size else [])
        itemsize, sum_itemsize = np.dtype(self.np_dtype).itemsize, np.dtype(self.summary_dtype).itemsize
        per_token = 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize
        if self.block_size:  # summaries: 2 vectors per block of block_size tokens
            per_token += -(-2 * self.n_layers * self.n_kv_heads * self.head_dim * sum_itemsize // self.block_size)
        label = {"dense": "dense", "exact": "topk", "block": "topk-block"}.get(att["mode"], att["mode"])
        self.spec = RunnerSpec(
            "onnxruntime",
            int(m["vocab_size"]),
            int(m["context_length"]),
            per_token,
            label,
            capacity_multiple=int(rt["kv_cache"].get("capacity_multiple") or 1),
        )

        opts = ort.SessionOptions()
        # errors only: at load onnxruntime warns about every overridable initializer, and the
        # attention_dense input is one on purpose (docs/export.md); a failed load still raises
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.plugin = False
        if use_plugin and rt.get("custom_ops"):
            try:
                from ..plugin import register_plugin  # lands with the plugin branch
            except ImportError:
                register_plugin = None
            self.plugin = bool(register_plugin and register_plugin(opts))
        self.page_size = 0
        if paged:
            info = rt["kv_cache"].get("paged")
            if not info:
                raise RagtopError(
                    f"{folder} has no paged graph: re-export with --paged-kv "
                    "(or add one to the folder with ragtop.export.onnx.write_paged_graph)"
                )
            self.page_size = int(info["page_size"])
            model_file = model_file or info["filename"]
            self.spec = dataclasses.replace(self.spec, page_size=self.page_size)
        path = folder / (model_file or dec["filename"])
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types
            raise RagtopError(f"cannot open {path} with onnxruntime: {e}") from None
        # graphs exported with the per-sequence dense flag (ops.py attention_dense) can verify
        # speculative drafts densely on the same weights; older ones cannot
        # (an input with a default value: onnxruntime lists it among the overridable initializers)
        feedable = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        self.dense_flag = any(i.name == "attention_dense" for i in feedable)
        if self.dense_flag:
            self.spec = dataclasses.replace(self.spec, dense_chunks=True)
        self.buffers: dict[tuple[int, str], np.ndarray] = {}
        self.lengths = np.zeros(0, dtype=np.int64)
        self.capacity = 0
        # One IOBinding per slot range, its cache inputs/outputs bound once (2 x layers x kinds
        # binds cost ~3 ms a step for SmolLM2); a step rebinds only the small inputs.
        self._bindings: dict[tuple[int, int], Any] = {}
        self.block_tables: list[list[int]] = []  # paged: per slot, set by the engine's cache manager

    @classmethod
    def from_folder(
        cls, folder: Path, threads: int | None = None, model_file: str | None = None, paged: bool = False
    ) -> OrtRunner:
        return cls(folder, threads, model_file=model_file, paged=paged)

    # -- cache ----------------------------------------------------------------------------
    def allocate(self, slots: int, capacity: int) -> None:
        self.capacity = round_up(capacity, self.spec.capacity_multiple)
        self.buffers = {}
        for i in range(self.n_layers):
            for kind in self.kinds:
                summary = kind.startswith("key_m")
                positions = self.capacity // self.block_size if summary else self.capacity
                self.buffers[i, kind] = np.zeros(
                    (slots, self.n_kv_heads, positions, self.head_dim),
                    dtype=self.summary_dtype if summary else self.np_dtype,
                )
        self.lengths = np.zeros(slots, dtype=np.int64)
        self._bindings = {}

    def allocate_pages(self, num_pages: int) -> None:
        """Paged mode: a pool of `num_pages` pages per layer and kind."""
        if not self.page_size:
            raise RagtopError("allocate_pages on a runner opened without paged=True")
        P = self.page_size
        self.buffers = {}
        for i in range(self.n_layers):
            for kind in self.kinds:
                summary = kind.startswith("key_m")
                rows = P // self.block_size if summary else P
                self.buffers[i, kind] = np.zeros(
                    (num_pages, self.n_kv_heads, rows, self.head_dim),
                    dtype=self.summary_dtype if summary else self.np_dtype,
                )
        self.capacity = 0
        self._bindings = {}

    def copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole pages (src, dst): a forked sequence's own copy of a partial page."""
        for src, dst in pairs:
            for buf in self.buffers.values():
                buf[dst] = buf[src]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        for (_, kind), buf in self.buffers.items():
            n = -(-length // self.block_size) if kind.startswith("key_m") else length
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = length

    def rollback(self, slot: int, length: int, since: int) -> None:
        """Speculative drafts wrote (and merged into the block summaries) keys at positions
        >= `since` that are gone now: recompute the summaries of the blocks from `since`'s
        to `length`'s from the keys kept, so they are exactly what a run without drafts holds
        (min/max are exact, so the result is bit-identical). Keys past `length` need nothing:
        no query sees them before they are rewritten."""
        if self.page_size:
            return self._rollback_paged(slot, length, since)
        self.lengths[slot] = length
        if not self.block_size or length <= 0:
            return
        bs = self.block_size
        first, last = min(since, length - 1) // bs, (length - 1) // bs
        for i in range(self.n_layers):
            keys = self.buffers[i, "key"][slot]  # [Hkv, C, Dh]
            for blk in range(first, last + 1):
                rows = keys[:, blk * bs : min((blk + 1) * bs, length)]
                self.buffers[i, "key_min"][slot, :, blk] = rows.min(axis=1)
                self.buffers[i, "key_max"][slot, :, blk] = rows.max(axis=1)

    def _rollback_paged(self, slot: int, length: int, since: int) -> None:
        if not self.block_size or length <= 0:
            return
        bs, P, table = self.block_size, self.page_size, self.block_tables[slot]
        first, last = min(since, length - 1) // bs, (length - 1) // bs
        for i in range(self.n_layers):
            keys = self.buffers[i, "key"]  # [N, Hkv, P, Dh]
            for blk in range(first, last + 1):
                j0, j1 = blk * bs, min((blk + 1) * bs, length)
                if j0 // P >= len(table):  # the sequence finished and gave this page back
                    break
                page, r0 = table[j0 // P], j0 % P
                rows = keys[page, :, r0 : r0 + (j1 - j0)]
                self.buffers[i, "key_min"][page, :, r0 // bs] = rows.min(axis=1)
                self.buffers[i, "key_max"][page, :, r0 // bs] = rows.max(axis=1)

    def close(self) -> None:
        self.buffers, self._bindings = {}, {}

    # -- forward ----------------------------------------------------------------------------
    def forward(self, chunks: Sequence[Chunk]) -> list[np.ndarray | None]:
        if not self.buffers:
            raise RagtopError("OrtRunner.forward before allocate()")
        out: list[np.ndarray | None] = [None] * len(chunks)
        if self.page_size:
            for group in paged_groups(chunks):
                for i, row in zip(group, self._run_paged([chunks[i] for i in group]), strict=True):
                    out[i] = row
            return out
        for group in group_chunks(chunks):
            by_slot = {chunks[i].slot: i for i in group}
            # Block summaries must not see garbage keys: bind exactly the slots of a run.
            # Without summaries a slot range with idle rows is fine (see group_chunks).
            runs = contiguous_runs(by_slot) if self.block_size else [sorted(by_slot)]
            for run in runs:
                idx = [by_slot[s] for s in run]
                for i, row in zip(idx, self._run([chunks[i] for i in idx]), strict=True):
                    out[i] = row
        return out

    def _binding(self, lo: int, hi: int):
        """The IOBinding of slots [lo, hi) with every cache buffer bound as past and present."""
        io = self._bindings.get((lo, hi))
        if io is None:
            io = self.session.io_binding()
            for (i, kind), buf in self.buffers.items():
                view = buf[lo:hi]  # contiguous: slots are the outermost dimension
                shape, ptr = list(view.shape), view.ctypes.data
                dt = buf.dtype.type
                io.bind_input(self.io_names[f"past_{kind}_names"] % i, "cpu", 0, dt, shape, ptr)
                io.bind_output(self.out_names[f"present_{kind}_names"] % i, "cpu", 0, dt, shape, ptr)
            self._bindings[lo, hi] = io
        return io

    def _run(self, chunks: list[Chunk]) -> list[np.ndarray | None]:
        S, lo, hi = slot_range(chunks, self.capacity, self.lengths)
        lengths = np.minimum(self.lengths[lo:hi], self.capacity - S)  # idle rows: a garbage write past their length
        ids = np.zeros((hi - lo, S), dtype=np.int64)
        for c in chunks:
            ids[c.slot - lo] = c.tokens
        want_all = any(c.logits == "all" for c in chunks)
        keep = (
            np.tile(np.arange(S, dtype=np.int64), (hi - lo, 1))
            if want_all
            else np.full((hi - lo, 1), S - 1, dtype=np.int64)
        )

        io = self._binding(lo, hi)
        io.bind_cpu_input(self.io_names["input_ids"], ids)
        io.bind_cpu_input(self.io_names["past_lengths"], np.ascontiguousarray(lengths))
        io.bind_cpu_input(self.io_names["logits_indices"], keep)
        if self.dense_flag:
            dense = np.zeros(hi - lo, dtype=np.int64)
            for c in chunks:
                dense[c.slot - lo] = c.dense
            # by OrtValue: bind_cpu_input knows only inputs without a default value
            io.bind_ortvalue_input("attention_dense", ort_value(dense))
        elif any(c.dense for c in chunks) and self.spec.attention != "dense":
            raise RagtopError("this graph has no attention_dense input: re-export it to verify speculative drafts")
        logits = np.empty((hi - lo, keep.shape[1], self.spec.vocab_size), dtype=np.float32)
        io.bind_output(self.out_names["logits"], "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)  # writes logits [b, 1|S, V] and the cache in place
        for c in chunks:
            self.lengths[c.slot] = c.start + S
        return [
            None if c.logits == "none" else logits[c.slot - lo] if c.logits == "all" else logits[c.slot - lo, -1]
            for c in chunks
        ]

    def _run_paged(self, chunks: list[Chunk]) -> list[np.ndarray | None]:
        """One call over exactly `chunks` (equal lengths): their block tables, padded with
        page 0 (read past the sequence's keys, never visible nor written)."""
        S, B, P = len(chunks[0].tokens), len(chunks), self.page_size
        ids = np.asarray([c.tokens for c in chunks], dtype=np.int64).reshape(B, S)
        lengths = np.asarray([c.start for c in chunks], dtype=np.int64)
        need = [-(-(c.start + S) // P) for c in chunks]
        table = np.zeros((B, max(need)), dtype=np.int64)
        for b, c in enumerate(chunks):
            pages = self.block_tables[c.slot]
            if len(pages) < need[b]:
                raise RagtopError(f"slot {c.slot}: {len(pages)} pages hold fewer than {c.start + S} positions")
            table[b, : need[b]] = pages[: need[b]]
        want_all = any(c.logits == "all" for c in chunks)
        keep = np.tile(np.arange(S, dtype=np.int64), (B, 1)) if want_all else np.full((B, 1), S - 1, dtype=np.int64)
        io = self._bindings.get((0, 0))
        if io is None:  # the pools, bound once as past and present
            io = self.session.io_binding()
            for (i, kind), buf in self.buffers.items():
                shape, ptr, dt = list(buf.shape), buf.ctypes.data, buf.dtype.type
                io.bind_input(self.io_names[f"past_{kind}_names"] % i, "cpu", 0, dt, shape, ptr)
                io.bind_output(self.out_names[f"present_{kind}_names"] % i, "cpu", 0, dt, shape, ptr)
            self._bindings[0, 0] = io
        io.bind_cpu_input(self.io_names["input_ids"], ids)
        io.bind_cpu_input(self.io_names["past_lengths"], lengths)
        io.bind_cpu_input(self.io_names["logits_indices"], keep)
        io.bind_cpu_input("block_table", table)
        dense = np.asarray([c.dense for c in chunks], dtype=np.int64)
        if self.dense_flag:
            io.bind_ortvalue_input("attention_dense", ort_value(dense))
        elif dense.any() and self.spec.attention != "dense":
            raise RagtopError("this graph has no attention_dense input: re-export it to verify speculative drafts")
        logits = np.empty((B, keep.shape[1], self.spec.vocab_size), dtype=np.float32)
        io.bind_output(self.out_names["logits"], "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)
        return [
            None if c.logits == "none" else logits[b] if c.logits == "all" else logits[b, -1]
            for b, c in enumerate(chunks)
        ]


def paged_groups(chunks: Sequence[Chunk]) -> list[list[int]]:
    """Chunks run together with a paged cache: all decodes in one call, prefill chunks of
    equal length in one call each (any slots: no slot range to keep contiguous)."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        groups.setdefault(len(c.tokens), []).append(i)
    return [groups.pop(1)] + list(groups.values()) if 1 in groups else list(groups.values())
