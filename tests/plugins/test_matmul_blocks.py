"""ragtop::MatMulBlocks: the plugin kernel against a numpy reference and against its function
body (com.microsoft::MatMulNBits + the per-block minima), for every block format the export
emits: Q4_1-like 4-bit codes with per-block minima (default zero point 8), 4-bit codes with
explicit zero points (round-to-nearest), 8-bit codes (Q8_0, zero point 128); at accuracy
level 4 (int8-rounded input, as MLAS rounds it) and 0 (fp32). Skipped when the library is
not built. The other instruction-set paths are checked too (RAGTOP_MATMUL_ISA, in a subprocess:
the choice is made once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ragtop.bench.graphs import matmul_blocks_model
from ragtop.quant import QBlocks, quantize_rtn
from ragtop.runtime.plugin import plugin_library_path, register_plugin

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    plugin_library_path() is None, reason="plugin library not built (run `make install` with g++ and network to apt)"
)
ROWS = [1, 3, 17, 256]
FORMATS = ["q4_1", "rtn4", "q8_0"]


def session(model: bytes, plugin: bool = True, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if plugin:
        assert register_plugin(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def blocks(fmt: str, n: int, k: int, seed: int = 0) -> QBlocks:
    """A random [n, k] matrix in one of the export's block formats (K padded to whole blocks)."""
    rng = np.random.default_rng(seed)
    nb = -(-k // 32)
    if fmt == "rtn4":
        return quantize_rtn(rng.standard_normal((n, k)).astype(np.float32) * 0.1, 4)
    if fmt == "q8_0":  # codes q + 128, default zero point 128, no minima
        codes = rng.integers(1, 256, size=(n, nb * 32)).astype(np.uint8)
        return QBlocks(8, codes, (rng.random((n, nb)) * 0.01 + 1e-3).astype(np.float32), None, None)
    d = (rng.random((n, nb)) * 0.02 + 1e-3).astype(np.float32)  # Q4_1: w = d q + m -> d (q - 8) + (m + 8d)
    m = (rng.standard_normal((n, nb)) * 0.05).astype(np.float32)
    codes = rng.integers(0, 16, size=(n, nb * 32)).astype(np.uint8)
    return QBlocks(4, codes, d, None, (m + 8 * d).astype(np.float32))


def reference(q: QBlocks, x: np.ndarray, level: int) -> np.ndarray:
    """y = x @ W^T in float64 on the exact block values. Level 4: x rounded per block of 32
    with MLAS's float32 operations (scale amax / 127, codes rint(x * (127 / amax)), half to
    even); the minima term always reads the unrounded x."""
    M, k = x.shape
    n, nb = q.scales.shape
    xp = np.zeros((M, nb * 32), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(M, nb, 32)
    if level == 4:
        amax = np.abs(xb).max(-1, keepdims=True)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        xr = np.rint(xb * inv) * (amax / np.float32(127))
    else:
        xr = xb
    core = QBlocks(q.bits, q.codes, q.scales, q.zero_points, None).dequantize().astype(np.float64)
    y = xr.reshape(M, -1).astype(np.float64) @ core.T
    if q.mins is not None:
        y += xb.sum(-1, dtype=np.float64) @ q.mins.T.astype(np.float64)
    return y


def close(a: np.ndarray, b: np.ndarray, rtol: float = 2e-6) -> None:
    """Equal up to float32 summation order: relative to the output's range."""
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale * 8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [64, 48, 160])  # 48: K padded to whole blocks; 160: 5 blocks (not whole groups)
@pytest.mark.parametrize("level", [4, 0])
def test_kernel_matches_reference_and_body(fmt, k, level):
    q = blocks(fmt, 40, k)
    plugin = session(matmul_blocks_model(q, k, level))
    body = session(matmul_blocks_model(q, k, level), plugin=False)
    standard = session(matmul_blocks_model(q, k, level, standard=True), plugin=False)
    rng = np.random.default_rng(k + level)
    for M in ROWS:
        x = rng.standard_normal((M, k)).astype(np.float32)
        y = plugin.run(None, {"A": x})[0]
        assert y.shape == (M, 40) and y.dtype == np.float32
        close(y, reference(q, x, level))
        close(y, body.run(None, {"A": x})[0])
        np.testing.assert_array_equal(body.run(None, {"A": x})[0], standard.run(None, {"A": x})[0])


def test_level_4_rounds_the_input():
    """Level 4 is not level 0: an input whose blocks do not round exactly differs by about the
    int8 rounding, and exactly that (the kernel's integer products are exact)."""
    q = blocks("q4_1", 24, 64)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    y4 = session(matmul_blocks_model(q, 64, 4)).run(None, {"A": x})[0]
    y0 = session(matmul_blocks_model(q, 64, 0)).run(None, {"A": x})[0]
    diff = float(np.abs(y4 - y0).max())
    assert 1e-5 * float(np.abs(y0).max()) < diff < 0.05 * float(np.abs(y0).max())
    close(y4, reference(q, x, 4))


def test_leading_dimensions_and_empty_input():
    """A [B, S, K] input gives [B, S, N]; zero rows give an empty output."""
    q = blocks("q4_1", 16, 64)
    s = session(matmul_blocks_model(q, 64, 4))
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    model = matmul_blocks_model(q, 64, 4)
    import onnx

    m = onnx.ModelProto.FromString(model)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "B"
    m.graph.input[0].type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_param="S"))
    del m.graph.output[0].type.tensor_type.shape.dim[:]
    s = session(m.SerializeToString())
    y = s.run(None, {"A": x})[0]
    assert y.shape == (2, 3, 16)
    close(y.reshape(6, 16), reference(q, x.reshape(6, 64), 4))
    assert s.run(None, {"A": np.zeros((0, 1, 64), np.float32)})[0].shape == (0, 1, 16)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_result(threads):
    """Columns are split over the thread pool: every split computes the same values."""
    q = blocks("q4_1", 100, 96)
    x = np.random.default_rng(3).standard_normal((9, 96)).astype(np.float32)
    one = session(matmul_blocks_model(q, 96, 4), threads=1).run(None, {"A": x})[0]
    np.testing.assert_array_equal(session(matmul_blocks_model(q, 96, 4), threads=threads).run(None, {"A": x})[0], one)


def test_plugin_runs_the_kernel(tmp_path):
    """With the plugin, onnxruntime keeps the MatMulBlocks node (the kernel), not its body."""
    import onnx

    q = blocks("q4_1", 16, 64)
    so = ort.SessionOptions()
    assert register_plugin(so)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(matmul_blocks_model(q, 64, 4), so, providers=["CPUExecutionProvider"])
    ops_ = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops_ == ["MatMulBlocks"]
    stock = ort.SessionOptions()
    stock.optimized_model_filepath = str(tmp_path / "stock.onnx")
    ort.InferenceSession(matmul_blocks_model(q, 64, 4), stock, providers=["CPUExecutionProvider"])
    assert "MatMulNBits" in [n.op_type for n in onnx.load(str(tmp_path / "stock.onnx")).graph.node]


def test_unsupported_block_size_is_a_clear_error():
    import onnx

    m = onnx.ModelProto.FromString(matmul_blocks_model(blocks("q4_1", 16, 64), 64, 4))
    next(a for a in m.graph.node[0].attribute if a.name == "block_size").i = 16
    with pytest.raises(Exception, match="block_size must be 32"):
        session(m.SerializeToString()).run(None, {"A": np.zeros((1, 64), np.float32)})


@pytest.mark.parametrize("isa", ["generic", "avx2", "avxvnni"])
def test_other_instruction_sets_match_the_reference(isa):
    """RAGTOP_MATMUL_ISA=generic (portable loops), avx2 (vpmaddubsw) and avxvnni (256-bit
    vpdpbusd): the paths of CPUs without AVX-512 VNNI compute the same (a path this CPU lacks
    falls back to the best it has, which the test then checks again)."""
    code = (
        f"import numpy as np, sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_matmul_blocks import blocks, close, matmul_blocks_model, reference, session\n"
        "for fmt in ('q4_1', 'rtn4', 'q8_0'):\n"
        "    for k in (48, 160):\n"
        "        q = blocks(fmt, 40, k)\n"
        "        s = session(matmul_blocks_model(q, k, 4))\n"
        "        for M in (1, 3, 17):\n"
        "            x = np.random.default_rng(M).standard_normal((M, k)).astype(np.float32)\n"
        "            close(s.run(None, {'A': x})[0], reference(q, x, 4))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "RAGTOP_MATMUL_ISA": isa}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
