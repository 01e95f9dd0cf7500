"""The one interface every model runner (torch, onnxruntime, ...) implements.

A runner owns a slot-based, preallocated KV cache: `allocate(slots, capacity)` creates
per-layer buffers of [slots, Hkv, capacity, Dh]. A step hands it some `Chunk`s, each some
new tokens of one slot written at positions start..start+len-1; it returns, per chunk,
the logits of the last new token ([V]), of every new token ([len, V]), or nothing
(a middle chunk of a chunked prefill). The runner never copies the whole cache per step:
it binds (a contiguous slot range of) the buffers in place. A chunk may ask for dense
attention (`Chunk.dense`, when `spec.dense_chunks`): the verification pass of
self-speculative decoding runs on the same weights and cache as the sparse draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ...errors import RagtopError

LogitsWanted = Literal["none", "last", "all"]
Logits = Any  # [V] or [len, V] float32: numpy.ndarray (onnxruntime) or torch.Tensor (torch)


@dataclass(frozen=True)
class RunnerSpec:
    """What the engine needs to know about a model behind a runner."""

    name: str  # "torch", "onnxruntime", ...
    vocab_size: int
    max_model_len: int
    kv_bytes_per_token: int  # all layers, keys + values (+ block summaries)
    attention: str  # "dense", "topk", "topk-block": a label for stats
    capacity_multiple: int = 1  # cache capacity must be a multiple of this (block size)
    dense_chunks: bool = False  # Chunk.dense works: the same weights attend densely on demand
    page_size: int = 0  # > 0: a paged cache (allocate_pages, block_tables, copy_pages); kv_cache.py


@dataclass(frozen=True)
class Chunk:
    slot: int
    tokens: Sequence[int]
    start: int  # tokens already cached in this slot; the first new token's position
    logits: LogitsWanted = "last"
    dense: bool = False  # attend to every visible key (speculative verification; spec.dense_chunks)


@runtime_checkable
class ModelRunner(Protocol):
    spec: RunnerSpec

    def allocate(self, slots: int, capacity: int) -> None:
        """Preallocate the cache: `slots` sequences of `capacity` tokens (rounded up)."""

    def forward(self, chunks: Sequence[Chunk]) -> list[Logits | None]:
        """Write the chunks' tokens into their slots; logits per chunk (float32, CPU: a numpy
        array, or a torch tensor from the torch runner; the engine reads either with numpy)."""

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot src into slot dst (n > 1)."""

    def rollback(self, slot: int, length: int, since: int) -> None:
        """Keep the first `length` positions of the slot; positions from `since` on were
        rewritten since the slot last held exactly its tokens (speculative drafts). Whatever
        the runner keeps about the cached keys (block summaries) is made exact again."""

    def close(self) -> None:
        """Free the cache and the session."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def slot_range(chunks: Sequence[Chunk], capacity: int, lengths) -> tuple[int, int, int]:
    """(S, lo, hi) of one model call: its chunks' common length and the contiguous slot range
    [lo, hi) covering them. Checks that every chunk fits the capacity and records each chunk's
    start in `lengths` (a per-slot numpy array or tensor)."""
    S = len(chunks[0].tokens)
    lo, hi = min(c.slot for c in chunks), max(c.slot for c in chunks) + 1
    for c in chunks:
        if c.start + S > capacity:
            raise RagtopError(f"slot {c.slot}: {c.start} + {S} tokens exceed the cache capacity {capacity}")
        lengths[c.slot] = c.start
    return S, lo, hi


def group_chunks(chunks: Sequence[Chunk]) -> list[list[int]]:
    """Indices of chunks run together in one model call, with no padding:

    - all one-token chunks (decodes), first. The call binds the contiguous slot range that
      covers them; rows of that range that are not in the call write one garbage position
      past their own length, which no query sees and the next real write overwrites (a slot
      at full capacity has finished, so that position always exists). Decodes go first so
      that a slot whose prefill ends this step is not at the end of its capacity yet.
    - longer chunks (prefill) of equal length whose slots are consecutive: no idle rows, so
      nothing is written outside the chunks' own positions.
    """
    singles = [i for i, c in enumerate(chunks) if len(c.tokens) == 1]
    groups = [singles] if singles else []
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        if len(c.tokens) > 1:
            by_length.setdefault(len(c.tokens), []).append(i)
    for idx in by_length.values():
        idx.sort(key=lambda i: chunks[i].slot)
        run = [idx[0]]
        for i in idx[1:]:
            if chunks[i].slot == chunks[run[-1]].slot + 1:
                run.append(i)
            else:
                groups.append(run)
                run = [i]
        groups.append(run)
    return groups
