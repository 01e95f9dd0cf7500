"""`export-model --kv-dtype fp16`: a float16 KV cache under float32 activations.

Validation compares like with like: the PyTorch reference stores its keys/values rounded to
float16 (model/attention.py write_cache), so the export passes the fp32 tolerances; the
stored cache may differ by one float16 step where the graph's fp32 key differs from
PyTorch's by ~1e-6 (verify.compare_case). Each mode also runs with the plugin kernels and
must give the function body's logits (atol 1e-4) and greedy tokens.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ragtop.cli import export_model_main
from ragtop.export.verify import SharedCacheRunner
from ragtop.runtime.plugin import plugin_library_path

MODES = [("block", "ragged"), ("topk", "uniform"), ("dense", "uniform")]


@pytest.fixture(scope="module")
def fp16_exports(make_checkpoint, tmp_path_factory):
    done = {}
    for attention, embedding in MODES:
        out = tmp_path_factory.mktemp("kv16") / f"{attention}-{embedding}"
        rc = export_model_main([str(make_checkpoint(attention, embedding)), str(out), "--kv-dtype", "fp16"])
        done[attention] = rc, out
    return done


@pytest.mark.parametrize("attention", [m[0] for m in MODES])
def test_fp16_cache_export_validates(fp16_exports, attention):
    rc, out = fp16_exports[attention]
    assert rc == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["validation"]["passed"] and report["validation"]["greedy_match"]
    g = json.loads((out / "genai_config.json").read_text())
    kv = g["ragtop"]["kv_cache"]
    assert kv["dtype"] == "float16" and g["model"]["decoder"]["dtype"] == "fp32"
    assert kv["summary_dtype"] == ("float32" if attention == "block" else None)
    types = {i.name: i.type for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()}
    assert types["past_key_values.0.key"] == types["past_key_values.0.value"] == "tensor(float16)"
    if attention == "block":
        assert types["past_key_values.0.key_min"] == "tensor(float)"
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert meta["ragtop.kv_dtype"] == "fp16"


@pytest.mark.skipif(plugin_library_path() is None, reason="plugin library not built")
@pytest.mark.parametrize("attention", ["block", "topk"])
def test_fp16_cache_plugin_matches_function_body(fp16_exports, attention):
    """The plugin's float16 kernels and the stock function body: same logits on a prefill
    and 12 greedy steps through the shared cache."""
    from ragtop.export.onnx import ExportSpec

    _, out = fp16_exports[attention]
    report = json.loads((out / "export_report.json").read_text())
    spec = ExportSpec(**report["spec"])
    prompt = np.array([report["validation"]["greedy_prompt"]])
    runs = []
    for plugin in (False, True):
        so = ort.SessionOptions()
        if plugin:
            so.register_custom_ops_library(str(plugin_library_path()))
        sess = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
        runner = SharedCacheRunner(sess, spec, 1, 64)
        logits, ids, toks = [], prompt, []
        for _ in range(12):
            row = runner.step(ids)[0, -1]
            logits.append(row)
            toks.append(int(row.argmax()))
            ids = np.array([[toks[-1]]])
        runs.append((np.stack(logits), toks, {k: v.numpy().copy() for k, v in runner.buffers.items()}))
    (body, body_toks, body_cache), (kern, kern_toks, kern_cache) = runs
    assert kern_toks == body_toks
    np.testing.assert_allclose(kern, body, atol=1e-4, rtol=0)
    assert body_cache["0.key"].dtype == np.float16
    n = prompt.shape[1] + 12
    for name, buf in body_cache.items():
        if not name.endswith(("key_min", "key_max")):  # the written rows: within a float16 step
            np.testing.assert_allclose(kern_cache[name][:, :, :n], buf[:, :, :n], atol=1e-3, rtol=2**-10)


def test_kv_dtype_fp32_with_fp16_activations_is_refused(make_checkpoint, tmp_path, capsys):
    ckpt = make_checkpoint("topk", "uniform")
    rc = export_model_main(
        [str(ckpt), str(tmp_path / "o"), "--dtype", "fp16", "--weights", "fp16", "--kv-dtype", "fp32"]
    )
    assert rc == 2
    assert "--kv-dtype fp32 with fp16 activations" in capsys.readouterr().err
