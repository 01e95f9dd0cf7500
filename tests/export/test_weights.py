"""--weights int4 / int8: block quantization (ragtop/quant.py) and the quantized export.

Real onnxruntime sessions throughout: single com.microsoft::MatMulNBits nodes check the
packing against numpy; tiny exports check the graph against PyTorch with the same
dequantized weights (fp32 compute at accuracy level 0, the default: float rounding only;
int8 compute at level 4: the activations' int8 rounding on top).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_models import PROMPT, tiny_model

from ragtop.cli import export_model_main
from ragtop.export.weights import plan, reference_model
from ragtop.quant import BLOCK, FileBlocks, QBlocks, quantize_rtn


def matmul_nbits(q: QBlocks, k: int, level: int = 0) -> ort.InferenceSession:
    n = q.codes.shape[0]
    inits = [numpy_helper.from_array(q.packed_codes(), "B"), numpy_helper.from_array(q.scales, "scales")]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.packed_zero_points(), "zp"))
    node = helper.make_node(
        "MatMulNBits",
        ["A"] + [i.name for i in inits],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=q.bits,
        block_size=BLOCK,
        accuracy_level=level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,k", [(4, 64), (4, 48), (4, 96), (8, 64), (8, 48)])
def test_rtn_blocks_run_in_matmul_nbits(bits, k):
    """Codes, scales and (packed) zero points in MatMulNBits' layout: onnxruntime computes
    x @ dequantize(q)^T, also when K is not whole blocks (48) or the block count is odd (96 -> 3)."""
    rng = np.random.default_rng(bits * 1000 + k)
    w = rng.standard_normal((40, k)).astype(np.float32) * 0.1
    w[3] = 0.0  # an all-zero row: scale 0
    w[5, :] = np.abs(w[5, :])  # a one-signed row: the zero point at the end of the range
    q = quantize_rtn(w, bits)
    deq = q.dequantize(k)
    step = (np.abs(w).max() / 127) if bits == 8 else (np.ptp(w) / 15)
    assert np.abs(deq - w).max() <= step / 2 + 1e-6  # round to nearest within a block
    x = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = matmul_nbits(q, k).run(None, {"A": x})
    np.testing.assert_allclose(y, x @ deq.T, rtol=1e-5, atol=1e-5)


def test_file_blocks_map_exactly():
    """Q4_1 (w = d*q + m) as 4-bit codes with the default zero point 8 and a per-block minimum
    m + 8d; Q8_0 (w = d*q) as 8-bit codes q + 128: the same values, and MatMulNBits (fp32
    compute) plus the minimum term reproduce x @ w^T to float rounding."""
    rng = np.random.default_rng(0)
    n, k = 24, 64
    d = (rng.random((n, k // BLOCK)) * 0.02 + 0.001).astype(np.float16)
    m = (-rng.random((n, k // BLOCK)) * 0.1).astype(np.float16)
    q4 = FileBlocks("q4_1", rng.integers(0, 16, (n, k)).astype(np.uint8), d, m)
    q8 = FileBlocks("q8_0", rng.integers(-127, 128, (n, k)).astype(np.int8), d)
    x = rng.standard_normal((5, k)).astype(np.float32)
    for fb in (q4, q8):
        mb = fb.matmul_blocks()
        np.testing.assert_allclose(mb.dequantize(), fb.dequantize(), rtol=1e-6, atol=1e-7)
        (y,) = matmul_nbits(mb, k).run(None, {"A": x})
        if mb.mins is not None:
            y = y + x.reshape(5, -1, BLOCK).sum(-1) @ mb.mins.T
        np.testing.assert_allclose(y, x @ fb.dequantize().T, rtol=1e-5, atol=1e-5)
    assert q8.matmul_blocks().bits == 8 and q4.matmul_blocks().bits == 4


def test_plan_and_reference():
    model = tiny_model("dense", "uniform")
    p4 = plan(model, "int4", {})
    assert {qw.source for qw in p4.values()} == {"rtn4", "rtn8"}
    assert p4["embed.weight"].blocks.bits == 8 and p4["layers.0.mlp.down_proj.weight"].blocks.bits == 4
    assert len(p4) == 1 + 7 * model.config.n_layers  # tied: the embedding is the head
    assert plan(model, "fp32", {}) == {} and reference_model(model, {}) is model
    ref = reference_model(model, p4)
    w = model.state_dict()["layers.1.attn.o_proj.weight"]
    assert not torch.equal(ref.state_dict()["layers.1.attn.o_proj.weight"], w)
    assert torch.equal(model.state_dict()["layers.1.attn.o_proj.weight"], w)  # the original is untouched


def matmul_nodes(path) -> list[tuple[str, str, int, int]]:
    """(op_type, overload, bits, accuracy_level) of every block-quantized matmul node."""
    m = onnx.load(str(path))
    return sorted(
        (
            n.op_type,
            n.overload,
            next(a.i for a in n.attribute if a.name == "bits"),
            next(a.i for a in n.attribute if a.name == "accuracy_level"),
        )
        for n in m.graph.node
        if n.op_type in ("MatMulNBits", "MatMulBlocks")
    )


@pytest.mark.parametrize("variant", [("dense", "uniform"), ("block", "ragged")])
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_quantized_export_validates(make_checkpoint, tmp_path, capsys, variant, weights):
    """Default: fp32 compute (accuracy level 0) on exactly the dequantized weights, so the fp32
    tolerance holds, greedy tokens included; 8-bit matrices run as two 4-bit halves; no float
    copy of a quantized matrix is left (a ragged embedding stays float: it is a custom op)."""
    ckpt = make_checkpoint(*variant)
    out = tmp_path / "q"
    assert export_model_main([str(ckpt), str(out), "--weights", weights]) == 0, capsys.readouterr().err
    report = json.loads((out / "export_report.json").read_text())
    assert report["validation"]["passed"] and report["validation"]["greedy_match"]
    assert report["validation"]["rtol"] == (1e-4 if variant[0] == "dense" else 2e-4)
    assert report["weights"]["kind"] == weights and report["weights"]["accuracy_level"] == 0
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["weights"], config["dtype"], config["matmul_accuracy_level"]) == (weights, "fp32", 0)
    matrices = 4 * 2 + (variant[1] == "uniform")  # 4 nodes per layer (q/k/v and gate/up stacked), + the tied head
    eight_bit = matrices if weights == "int8" else (variant[1] == "uniform")  # the head is 8-bit in int4
    nodes = matmul_nodes(out / "model.onnx")  # level 0: MatMulNBits, also under --matmul custom (the default)
    assert [(op, bits, level) for op, _, bits, level in nodes] == [("MatMulNBits", 4, 0)] * (matrices + eight_bit)
    m = onnx.load(str(out / "model.onnx"))
    floats = [
        i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) > 1
    ]
    left = [i.name for i in floats if not i.name.endswith(("_mins", "_scales")) and not i.name.startswith("rope_")]
    assert not left or variant[1] == "ragged", left  # the ragged embedding's tables and projections stay float
    from ragtop.export.onnx import weight_bytes

    fp32_bytes = (ckpt / "model.safetensors").stat().st_size
    assert weight_bytes(m) < (0.5 if weights == "int4" else 0.6) * fp32_bytes


def test_int8_compute_level_4(make_checkpoint, tmp_path, capsys):
    """--accuracy-level 4: MLAS int8 compute (inputs rounded to int8 per block of 32), 8-bit
    matrices as 8-bit nodes. The reference rounds the same way (Int8ActivationLinear): a tiny
    model matches it to fp32 rounding; without that rounding the logits differ."""
    ckpt = make_checkpoint("dense", "uniform")
    out = tmp_path / "q"
    rc = export_model_main([str(ckpt), str(out), "--weights", "int4", "--accuracy-level", "4"])
    assert rc == 0, capsys.readouterr().err
    from ragtop.export.commands import matmul_for_this_cpu

    # --matmul auto (the default): the plugin's kernel where it was measured faster (AVX-512 VNNI)
    four_bit = "MatMulBlocks" if matmul_for_this_cpu() == "custom" else "MatMulNBits"
    assert {(op, bits, level) for op, _, bits, level in matmul_nodes(out / "model.onnx")} == {
        (four_bit, 4, 4),
        ("MatMulNBits", 8, 4),
    }
    written = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["matmul"]
    assert written == matmul_for_this_cpu()
    report = json.loads((out / "export_report.json").read_text())
    v, v0 = report["validation"], report["validation_level0"]
    assert v["passed"] and v["greedy_match"] and v["rtol"] == 0.25
    assert max(c["max_abs_diff"]["logits"] for c in v["cases"]) < 1e-4  # two layers: no amplification
    assert v["informational"] == ["mixed_batch", "greedy"]  # reported, not gating at level 4
    # the same graph at level 0 was validated strictly against the fp32-compute reference
    assert v0["passed"] and v0["greedy_match"] and v0["rtol"] <= 2e-4 and not v0["informational"]
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]  # the level-0 twin is gone

    from ragtop.checkpoint import load_checkpoint
    from ragtop.export import weights as qweights
    from ragtop.quant import load_file_blocks

    model = load_checkpoint(ckpt).model
    planned = qweights.plan(model, "int4", load_file_blocks(ckpt))
    exact, rounded = qweights.reference_model(model, planned), qweights.reference_model(model, planned, 4)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exact(ids), rounded(ids)
    assert 0 < float((a - b).abs().max()) < 0.1 * float(a.abs().max())  # rounded, and only slightly


def test_level_4_validation_still_fails_a_wrong_graph(make_checkpoint, tmp_path):
    """The level-0 twin gates strictly: a graph whose weights are off fails it, even where
    level 4's lenient tolerance would let the difference through."""
    from ragtop.checkpoint import load_checkpoint
    from ragtop.export import weights as qweights
    from ragtop.export.commands import write_level0_twin
    from ragtop.export.onnx import export_graph, make_spec, save_model
    from ragtop.export.verify import session, validate
    from ragtop.quant import load_file_blocks

    model = load_checkpoint(make_checkpoint("dense", "uniform")).model
    planned = qweights.plan(model, "int4", load_file_blocks(make_checkpoint("dense", "uniform")))
    spec = make_spec(model, 64, "custom", "fp32", 23, "int4", 4, "fp32")
    path = tmp_path / "model.onnx"
    save_model(export_graph(model, spec, quantized={k: v.blocks for k, v in planned.items()}), path)
    twin = write_level0_twin(path)
    prompt = list(range(1, 9))
    good = validate(qweights.reference_model(model, planned, 0), session(twin), spec, 1e-5, prompt, 4, rtol=2e-4)
    assert good.passed
    with torch.no_grad():  # the reference now differs from the graph by 1 % of one matrix's weights
        wrong = qweights.reference_model(model, planned, 0)
        w = next(m.weight for m in wrong.modules() if getattr(m, "weight", None) is not None and m.weight.ndim == 2)
        w.mul_(1.01)
    bad = validate(wrong, session(twin), spec, 1e-5, prompt, 4, rtol=2e-4)
    assert not bad.passed and not all(c.passed for c in bad.cases)


def test_int8_blocks_rounding():
    """int8_blocks: per block of 32, codes round(x * 127 / max|x|) (half to even) times the scale."""
    from ragtop.export.weights import int8_blocks

    x = torch.zeros(1, 40)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 0.5, 1.5  # scale 1: 0.5 -> 0, 1.5 -> 2 (half to even)
    x[0, 32:] = 0.0  # an all-zero block stays zero (scale 0)
    y = int8_blocks(x)
    assert y.shape == x.shape and y[0, 0] == 127 and y[0, 1] == 0 and y[0, 2] == 2 and not y[0, 32:].any()


def test_plugin_runs_quantized_graph(make_checkpoint, tmp_path):
    """The ragtop plugin's attention kernel with MatMulNBits around it: same greedy tokens."""
    from ragtop.export import mobile
    from ragtop.export.onnx import make_spec
    from ragtop.export.verify import greedy_onnx, session

    plugin = mobile.find_plugin_library(None)
    if plugin is None:
        pytest.skip("the ragtop plugin library is not built")
    out = tmp_path / "q"
    ckpt = make_checkpoint("topk", "uniform")
    assert export_model_main([str(ckpt), str(out), "--weights", "int4", "--no-validate"]) == 0
    from ragtop.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt).model
    spec = make_spec(model, model.config.max_seq_len, "custom", "fp32", 18, "int4", 0)
    plain = greedy_onnx(session(out / "model.onnx"), spec, PROMPT, 16, 32)
    with_plugin = greedy_onnx(session(out / "model.onnx", custom_op_library=str(plugin)), spec, PROMPT, 16, 32)
    assert plain == with_plugin


@pytest.mark.parametrize("level", [4, 0])
def test_matmul_custom_export(make_checkpoint, tmp_path, capsys, level):
    """--matmul custom: at level 4 the 4-bit matrices become ragtop::MatMulBlocks nodes (the
    8-bit head stays MatMulNBits), at level 0 nothing changes; the file validates without the
    plugin (the function bodies are the standard subgraph), and with the plugin's kernel it
    decodes the same greedy tokens as the standard export, with or without the plugin."""
    from ragtop.checkpoint import load_checkpoint
    from ragtop.export import mobile
    from ragtop.export.onnx import make_spec
    from ragtop.export.verify import greedy_onnx, session

    ckpt = make_checkpoint("block-sinks", "uniform")
    outs = {}
    for matmul in ("custom", "standard"):
        outs[matmul] = tmp_path / matmul
        args = [str(ckpt), str(outs[matmul]), "--weights", "int4", "--accuracy-level", str(level), "--matmul", matmul]
        assert export_model_main(args) == 0, capsys.readouterr().err
    custom = matmul_nodes(outs["custom"] / "model.onnx")
    if level == 4:  # 4 per layer (q/k/v and gate/up stacked) + the 8-bit head
        assert custom == sorted([("MatMulBlocks", "", 4, 4)] * 8 + [("MatMulNBits", "", 8, 4)])
    else:  # the head as its two 4-bit halves
        assert custom == [("MatMulNBits", "", 4, 0)] * 10
    assert all(op == "MatMulNBits" for op, *_ in matmul_nodes(outs["standard"] / "model.onnx"))
    report = json.loads((outs["custom"] / "export_report.json").read_text())
    assert report["validation"]["passed"] and report["options"]["matmul"] == "custom"
    written = json.loads((outs["custom"] / "genai_config.json").read_text())["model"]["decoder"]["matmul"]
    assert written == ("custom" if level == 4 else "standard")

    plugin = mobile.find_plugin_library(None)
    model = load_checkpoint(ckpt).model
    spec = make_spec(model, model.config.max_seq_len, "custom", "fp32", 23, "int4", level)
    libraries = [None] + ([str(plugin)] if plugin else [])
    tokens = {
        (m, lib): greedy_onnx(session(outs[m] / "model.onnx", custom_op_library=lib), spec, PROMPT, 16, 32)
        for m in outs
        for lib in libraries
    }
    assert len({tuple(t) for t in tokens.values()}) == 1, tokens


def test_level0_twin_rewrites_matmul_blocks(make_checkpoint, tmp_path, capsys):
    """write_level0_twin sets every MatMulBlocks node's accuracy_level to 0 too (its body reads it)."""
    from ragtop.export.commands import write_level0_twin

    out = tmp_path / "q"
    args = [str(make_checkpoint("dense", "uniform")), str(out), "--weights", "int4", "--accuracy-level", "4"]
    assert export_model_main([*args, "--matmul", "custom", "--no-validate"]) == 0, capsys.readouterr().err
    twin = write_level0_twin(out / "model.onnx")
    assert {level for *_, level in matmul_nodes(twin)} == {0}
    assert {level for *_, level in matmul_nodes(out / "model.onnx")} == {4}


def test_quantized_export_with_mins_and_padding(tmp_path):
    """A model whose matrices carry per-block minima (the GGUF's Q4_1 form) and whose K is not
    whole blocks: the MatMulBlocks export (mins overload, padded body) runs without the plugin
    and with it to the same logits as MatMulNBits."""
    from ragtop.export import mobile
    from ragtop.export.onnx import export_graph, make_spec
    from ragtop.export.verify import session
    from ragtop.model import ModelConfig, Transformer
    from ragtop.quant import FileBlocks

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=64, d_model=48, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=80, max_seq_len=16)
    ).eval()
    rng = np.random.default_rng(0)
    quantized = {}
    for name, w in model.state_dict().items():
        if name.startswith("layers.") and name.endswith("proj.weight"):
            n, k = w.shape
            kp = -(-k // 32) * 32
            fb = FileBlocks(
                "q4_1",
                rng.integers(0, 16, (n, kp)).astype(np.uint8),
                (rng.random((n, kp // 32)) * 0.02 + 0.001).astype(np.float16),
                (rng.standard_normal((n, kp // 32)) * 0.02).astype(np.float16),
            )
            quantized[name] = fb.matmul_blocks()
    ids = {"input_ids": np.arange(7)[None], "past_lengths": np.zeros(1, np.int64), "logits_indices": np.arange(7)[None]}
    plugin = mobile.find_plugin_library(None)
    logits = []
    for matmul in ("standard", "custom"):
        spec = make_spec(model, 16, "custom", "fp32", 23, "int4", 4, matmul=matmul)
        path = tmp_path / f"{matmul}.onnx"
        onnx.save(export_graph(model, spec, quantized=quantized), str(path))
        feeds = dict(ids)
        for i in session(path).get_inputs()[3:]:
            feeds[i.name] = np.zeros(
                [1 if d == "batch" else 16 if not isinstance(d, int) else d for d in i.shape], np.float32
            )
        for kw in [{}] + ([{"custom_op_library": str(plugin)}] if plugin else []):
            logits.append(session(path, **kw).run(["logits"], feeds)[0])
    for y in logits[1:]:
        np.testing.assert_allclose(y, logits[0], rtol=0, atol=1e-5 * float(np.abs(logits[0]).max()))
