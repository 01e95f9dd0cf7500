"""Block-quantized weights: a GGUF file's own blocks, and round-to-nearest for the rest.

Two forms live here:

- **File blocks** (`FileBlocks`): what a GGUF holds, kept by `ragtop import` in the
  checkpoint's `quantized.safetensors` so the exporter can emit the file's own values
  instead of a second rounding of them. Q4_1 (blocks of 32: fp16 scale `d`, fp16 minimum
  `m`, 4-bit `q`, w = d·q + m) and Q8_0 (fp16 `d`, int8 `q`, w = d·q). Dequantised with
  llama.cpp's arithmetic (fp32, `d*q + m`), they equal the checkpoint's fp32 weights bit for bit.
- **Matmul blocks** (`QBlocks`): the form onnxruntime's `com.microsoft::MatMulNBits` takes —
  per output row, blocks of 32 along the input, `bits`-bit codes, fp32 scales, optional
  uint8 zero points (default 2^(bits-1)) — plus an optional per-block additive term `mins`:
  w = scale·(code − zero_point) + mins.

Q4_1 has no exact uint8 zero point (−m/d is rarely an integer) and MatMulNBits' float zero
points run its unpacked path (the whole weight dequantised on every call, ~30x slower on
this machine, docs/export.md), so a Q4_1 block becomes codes `q` with the default zero point
8, scale `d`, and `mins = m + 8d`: x·w = Σ_b d_b Σ_i x_i (q_i − 8) + (m_b + 8 d_b) Σ_i x_i —
the file's values exactly, the second sum a small fp32 MatMul on per-block sums of x.
Q8_0 is exact as 8-bit codes q + 128 with the default zero point 128.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import RagtopError

BLOCK = 32
BLOCKS_FILE = "quantized.safetensors"  # beside model.safetensors in a checkpoint folder
FORMAT = "ragtop-blocks/1"


@dataclass
class FileBlocks:
    """One GGUF tensor's blocks, rows already in ragtop's layout: codes [N, K], d/m [N, K/32]."""

    kind: str  # q4_1 | q8_0
    codes: np.ndarray  # uint8 (q4_1, 0..15) or int8 (q8_0)
    d: np.ndarray  # float16
    m: np.ndarray | None = None  # float16, q4_1 only

    def dequantize(self) -> np.ndarray:
        """llama.cpp's (and gguf-py's) arithmetic: fp32 d*q (+ m), per block of 32."""
        N, K = self.codes.shape
        q = self.codes.reshape(N, K // BLOCK, BLOCK).astype(np.float32)
        w = self.d.astype(np.float32)[..., None] * q
        if self.m is not None:
            w = w + self.m.astype(np.float32)[..., None]
        return w.reshape(N, K)

    def matmul_blocks(self) -> QBlocks:
        d = self.d.astype(np.float32)
        if self.kind == "q8_0":
            return QBlocks(8, (self.codes.astype(np.int16) + 128).astype(np.uint8), d, None, None)
        assert self.m is not None
        return QBlocks(4, self.codes.astype(np.uint8), d, None, self.m.astype(np.float32) + 8 * d)


def parse_gguf_blocks(kind: str, raw: np.ndarray, rows: int, cols: int) -> FileBlocks:
    """Raw GGUF bytes of a [rows, cols] tensor (uint8 [rows, bytes per row]) -> FileBlocks."""
    nb = cols // BLOCK
    if kind == "q4_1":
        b = raw.reshape(rows, nb, 20)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        m = b[..., 2:4].copy().view(np.float16)[..., 0]
        qs = b[..., 4:20]  # element j in the low nibble of byte j, element j+16 in the high nibble
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols).astype(np.uint8)
        return FileBlocks(kind, codes, d, m)
    if kind == "q8_0":
        b = raw.reshape(rows, nb, 34)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        codes = b[..., 2:34].copy().view(np.int8).reshape(rows, cols)
        return FileBlocks(kind, codes, d)
    raise ValueError(f"unsupported block kind {kind}")


def permute_rows(fb: FileBlocks, perm) -> FileBlocks:
    """Apply a row permutation (e.g. undoing llama.cpp's q/k row order) to every part."""
    return FileBlocks(fb.kind, perm(fb.codes), perm(fb.d), None if fb.m is None else perm(fb.m))


def save_file_blocks(folder: Path, blocks: dict[str, FileBlocks], source: str) -> Path:
    from safetensors.numpy import save_file

    tensors, kinds = {}, {}
    for name, fb in blocks.items():
        kinds[name] = fb.kind
        tensors[f"{name}.codes"] = np.ascontiguousarray(fb.codes)
        tensors[f"{name}.d"] = np.ascontiguousarray(fb.d)
        if fb.m is not None:
            tensors[f"{name}.m"] = np.ascontiguousarray(fb.m)
    path = Path(folder) / BLOCKS_FILE
    save_file(tensors, str(path), metadata={"format": FORMAT, "source": source, "kinds": json.dumps(kinds)})
    return path


def load_file_blocks(folder: Path) -> dict[str, FileBlocks]:
    """The checkpoint's file blocks by state-dict name ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / BLOCKS_FILE
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise RagtopError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
            kinds = json.loads(meta["kinds"])
            return {
                name: FileBlocks(
                    kind,
                    f.get_tensor(f"{name}.codes"),
                    f.get_tensor(f"{name}.d"),
                    f.get_tensor(f"{name}.m") if kind == "q4_1" else None,
                )
                for name, kind in kinds.items()
            }
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise RagtopError(f"corrupt {path}: {e}") from None


@dataclass
class QBlocks:
    """MatMulNBits form of an [N, K] weight: w[n, k] = scales[n, b]·(codes[n, k] − zp[n, b]) + mins[n, b]."""

    bits: int  # 4 or 8
    codes: np.ndarray  # uint8 [N, nb*32] (K padded to whole blocks with the zero point)
    scales: np.ndarray  # float32 [N, nb]
    zero_points: np.ndarray | None  # uint8 [N, nb]; None: the default 2^(bits-1)
    mins: np.ndarray | None  # float32 [N, nb] added per block; None: 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.scales.shape[1] * BLOCK

    def dequantize(self, k: int | None = None) -> np.ndarray:
        N, Kp = self.codes.shape
        nb = Kp // BLOCK
        zp = (
            np.float32(1 << (self.bits - 1))
            if self.zero_points is None
            else self.zero_points.astype(np.float32)[..., None]
        )
        c = self.codes.reshape(N, nb, BLOCK).astype(np.float32)
        w = self.scales[..., None] * (c - zp)
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(N, Kp)[:, : (k or Kp)]

    def packed_codes(self) -> np.ndarray:
        """B of MatMulNBits: uint8 [N, nb, 32·bits/8], 4-bit codes two per byte, low nibble first."""
        N, Kp = self.codes.shape
        c = self.codes.reshape(N, Kp // BLOCK, BLOCK)
        if self.bits == 8:
            return np.ascontiguousarray(c)
        return np.ascontiguousarray(c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """zero_points of MatMulNBits: uint8, 4-bit values two per byte per row ([N·ceil(nb/2)])."""
        if self.zero_points is None:
            return None
        z = self.zero_points
        if self.bits == 8:
            return z.reshape(-1).copy()
        if z.shape[1] % 2:
            z = np.pad(z, ((0, 0), (0, 1)))
        return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def concat_rows(parts: list[QBlocks]) -> QBlocks | None:
    """Matrices with the same input (q/k/v, gate/up) stacked along N into one MatMulNBits
    (one node, one pass over the activations), or None when their forms differ (bits, or
    zero points present in some and not others). Missing `mins` become zeros."""
    first = parts[0]
    if any(
        p.bits != first.bits
        or p.codes.shape[1] != first.codes.shape[1]
        or (p.zero_points is None) != (first.zero_points is None)
        for p in parts
    ):
        return None
    mins = None
    if any(p.mins is not None for p in parts):
        mins = np.concatenate([p.mins if p.mins is not None else np.zeros_like(p.scales) for p in parts])
    zp = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
    return QBlocks(
        first.bits, np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]), zp, mins
    )


def nibble_split(q: QBlocks) -> tuple[QBlocks, QBlocks]:
    """An 8-bit matrix as two 4-bit ones (high and low nibble of the code u = 16h + l):
    s·(u − z) = 16s·(h − 8) + s·(l − 8) + s·(136 − z), the last term as `mins` of the first.
    MatMulNBits computes 4-bit blocks in fp32 with packed weights (accuracy level 0), while
    8-bit blocks at that level are dequantised whole on every call (docs/export.md): the split
    keeps 8 bits per weight and fp32 compute, exactly."""
    assert q.bits == 8
    z = np.float32(128) if q.zero_points is None else q.zero_points.astype(np.float32)
    mins = q.scales * (np.float32(136) - z) + (0 if q.mins is None else q.mins)
    hi = QBlocks(4, q.codes >> 4, (16 * q.scales).astype(np.float32), None, mins.astype(np.float32))
    lo = QBlocks(4, q.codes & 0x0F, q.scales, None, None)
    return hi, lo


def quantize_rtn(w: np.ndarray, bits: int) -> QBlocks:
    """Round-to-nearest block quantization of an [N, K] fp32 weight, blocks of 32 along K.

    8 bits: symmetric (Q8_0-like, scale = max|w|/127, codes q + 128, default zero point);
    4 bits: asymmetric (scale = (max − min)/15, uint8 zero point = round(−min/scale)),
    the min/max range including 0 so that the zero point is a valid code.
    """
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    nb = -(-K // BLOCK)
    wp = np.zeros((N, nb * BLOCK), dtype=np.float32)
    wp[:, :K] = w
    b = wp.reshape(N, nb, BLOCK)
    if bits == 8:
        amax = np.abs(b).max(-1)
        scales = (amax / 127).astype(np.float32)
        inv = np.where(scales > 0, 1 / np.where(scales > 0, scales, 1), 0)
        q = np.clip(np.rint(b * inv[..., None]), -127, 127).astype(np.int16) + 128
        return QBlocks(8, q.astype(np.uint8).reshape(N, -1), scales, None, None)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    scales = ((hi - lo) / 15).astype(np.float32)
    safe = np.where(scales > 0, scales, 1)
    zp = np.clip(np.rint(-lo / safe), 0, 15)
    q = np.clip(np.rint(b / safe[..., None]) + zp[..., None], 0, 15)
    return QBlocks(4, q.astype(np.uint8).reshape(N, -1), scales, zp.astype(np.uint8), None)


def exact_file_blocks(fb: FileBlocks | None, weight: torch.Tensor) -> bool:
    """Whether the file's blocks still describe `weight` exactly (not fine-tuned or converted since)."""
    if fb is None or tuple(fb.codes.shape) != tuple(weight.shape):
        return False
    return bool(np.array_equal(fb.dequantize(), weight.detach().float().cpu().numpy()))
