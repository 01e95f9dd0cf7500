"""TorchRunner: the reference runner, a `Transformer` from a checkpoint in eager torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ...checkpoint import load_checkpoint
from ...errors import RagtopError
from ...gpu import resolve_device, triton_path
from ...model import KVCache, Transformer
from .base import Chunk, RunnerSpec, group_chunks, round_up, slot_range


def attention_label(model: Transformer) -> str:
    a = model.config.attention
    return a.kind if a.block_size is None else f"{a.kind}-block"


class TorchRunner:
    def __init__(
        self, model: Transformer, name: str = "torch", device: str | None = None, triton: bool | None = None
    ) -> None:
        """device: where the model runs ("cpu", "cuda", ...; default: where its weights are).
        triton: run block-selection decode and ragged embeddings through ragtop.gpu's Triton
        kernels (default: on CUDA when triton is installed; on CPU only under TRITON_INTERPRET=1)."""
        if device is not None:
            model = model.to(resolve_device(device))
        cfg = model.config
        self.model = model.eval()
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.spec = RunnerSpec(
            name=name,
            vocab_size=cfg.vocab_size,
            max_model_len=cfg.max_seq_len,
            kv_bytes_per_token=2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize,
            attention=attention_label(model),
            dense_chunks=cfg.attention.kind == "topk",
        )
        self.cache: KVCache | None = None
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens written per slot (incl. garbage)
        self.triton = triton_path(model, self.device, triton)  # None: the reference code only

    @classmethod
    def from_checkpoint(cls, path: Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> TorchRunner:
        return cls(load_checkpoint(path, dtype=dtype).model, device=device)

    def allocate(self, slots: int, capacity: int) -> None:
        capacity = round_up(capacity, self.spec.capacity_multiple)
        self.cache = KVCache.allocate(self.model.config, slots, capacity, dtype=self.dtype)
        self.cache.keys = [k.to(self.device) for k in self.cache.keys]
        self.cache.values = [v.to(self.device) for v in self.cache.values]
        self.lengths = torch.zeros(slots, dtype=torch.long)
        if self.triton is not None:
            self.triton.allocate(slots, capacity)

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.capacity

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk]) -> list[Tensor | None]:
        if self.cache is None:
            raise RagtopError("TorchRunner.forward before allocate()")
        out: list[Tensor | None] = [None] * len(chunks)
        for group in group_chunks(chunks):
            logits = self._run([chunks[i] for i in group])
            for i, row in zip(group, logits, strict=True):
                out[i] = row
        return out

    def _run(self, chunks: list[Chunk]) -> list[Tensor | None]:
        """One model call over the contiguous slot range covering the chunks (a view)."""
        assert self.cache is not None
        S, lo, hi = slot_range(chunks, self.capacity, self.lengths)
        lengths = self.lengths[lo:hi].clamp(max=self.capacity - S)  # idle rows: a garbage write past their length
        ids = torch.zeros(hi - lo, S, dtype=torch.long)
        for c in chunks:
            ids[c.slot - lo] = torch.as_tensor(list(c.tokens), dtype=torch.long)
        # Only the first `end` positions can be visible to anyone in this call: bind
        # [lo:hi, :, :end] views of the buffers, so attention cost follows the lengths.
        end = int(lengths.max()) + S
        if self.triton is not None:
            self.triton.bind_rows(lo, hi)
        view = KVCache(
            keys=[k[lo:hi, :, :end] for k in self.cache.keys],
            values=[v[lo:hi, :, :end] for v in self.cache.values],
            lengths=lengths.to(self.device),
        )
        want_all = any(c.logits == "all" for c in chunks)
        dense = None
        if any(c.dense for c in chunks):
            dense = torch.zeros(hi - lo, dtype=torch.bool)
            for c in chunks:
                dense[c.slot - lo] = c.dense
            dense = dense.to(self.device)
        logits = (
            self.model(ids.to(self.device), cache=view, last_only=not want_all, dense_rows=dense).float().cpu()
        )  # [b,S|1,V]
        for c in chunks:
            self.lengths[c.slot] = c.start + S
        rows: list[Tensor | None] = []
        for c in chunks:
            r = logits[c.slot - lo]
            rows.append(None if c.logits == "none" else r if c.logits == "all" else r[-1])
        return rows

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        assert self.cache is not None
        for buf in (*self.cache.keys, *self.cache.values):
            buf[dst, :, :length] = buf[src, :, :length]
        self.lengths[dst] = length
        if self.triton is not None:
            self.triton.copy_slot(src, dst, length)

    def rollback(self, slot: int, length: int, since: int) -> None:
        """Only the length: this runner keeps nothing else about the keys (block summaries
        are computed from the visible keys in each call)."""
        self.lengths[slot] = length

    def close(self) -> None:
        self.cache = None
        if self.triton is not None:
            self.triton.release()
