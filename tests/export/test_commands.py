"""`export-model` end to end: folder layout, genai_config.json, report, .ort, int8, errors."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from ragtop.cli import export_model_main, main
from ragtop.export import mobile


@pytest.fixture(scope="module")
def full_export(make_checkpoint, tmp_path_factory):
    """One export with every option: block-selection top-k, ragged embedding."""
    ckpt = make_checkpoint("block", "ragged")
    out = tmp_path_factory.mktemp("export") / "out"
    text = tmp_path_factory.mktemp("text") / "heldout.txt"
    text.write_text("the people of the union ask what the congress can do for the state " * 20)
    rc = export_model_main(
        [str(ckpt), str(out), "--ort-format", "--quantize", "int8", "--eval-text", str(text), "--eval-tokens", "200"]
    )
    return rc, ckpt, out


def test_folder_layout_and_metadata(full_export):
    rc, ckpt, out = full_export
    assert rc == 0
    for name in (
        "model.onnx",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tiers.json",
        "genai_config.json",
        "export_report.json",
        "model.ort",
        "required_operators.config",
        "model.int8.onnx",
    ):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_text() == (ckpt / "tokenizer.json").read_text()
    g = json.loads((out / "genai_config.json").read_text())
    dec = g["model"]["decoder"]
    assert dec["filename"] == "model.onnx" and dec["num_hidden_layers"] == 2 and dec["num_key_value_heads"] == 2
    assert dec["inputs"]["past_key_min_names"] % 1 == "past_key_values.1.key_min"
    assert dec["outputs"]["present_value_names"] % 0 == "present.0.value"
    r = g["ragtop"]
    assert r["attention"] | {"scale": 0} == {
        "mode": "block",
        "kind": "topk",
        "topk": 3,
        "block_size": 4,
        "block_budget": 2,
        "sink_tokens": 0,
        "local_window": 0,
        "dense_layers": 0,
        "scale": 0,
        "rope_theta": 10000.0,
    }
    assert r["kv_cache"]["capacity_multiple"] == 4 and r["kv_cache"]["share_past_and_present"]
    assert r["embedding"]["num_tiers"] == 2 and r["custom_ops"]["ops"] == ["TopKAttention", "RaggedEmbedding"]
    # every input/output named in genai_config exists in the graph
    sess = ort.InferenceSession(str(out / "model.onnx"))
    names = {i.name for i in sess.get_inputs()} | {o.name for o in sess.get_outputs()}
    for table in (dec["inputs"], dec["outputs"]):
        for v in table.values():
            assert (v % 1 if "%d" in v else v) in names


def test_report_validation_ort_and_int8(full_export):
    _, _, out = full_export
    rep = json.loads((out / "export_report.json").read_text())
    assert rep["validation"]["passed"] and rep["validation"]["greedy_match"]
    assert len(rep["validation"]["greedy_onnx"]) == 32
    assert {c["name"] for c in rep["validation"]["cases"]} == {"prefill", "decode", "mixed_batch", "empty_batch"}
    assert rep["ort_format"]["validation"]["passed"]
    assert "skipped" in rep["ort_format"]["plugin"] or rep["ort_format"]["plugin"]["validation"]["passed"]
    assert rep["int8"]["tokens"] > 100 and rep["int8"]["top1_agreement"] >= 0.8
    assert rep["int8"]["model.int8.onnx"] < rep["files"]["model.onnx"]
    assert "ai.onnx" in (out / "required_operators.config").read_text()
    assert "ragtop" not in (out / "required_operators.config").read_text()  # functions inlined


def test_ort_file_loads_and_runs(full_export):
    _, _, out = full_export
    sess = ort.InferenceSession(str(out / "model.ort"))
    feeds = {"input_ids": np.array([[1, 2, 3]]), "past_lengths": np.array([0]), "logits_indices": np.array([[2]])}
    for i in range(2):
        for kind, slots in (("key", 8), ("value", 8), ("key_min", 2), ("key_max", 2)):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, slots, 8), np.float32)
    logits = sess.run(["logits"], feeds)[0]
    assert logits.shape == (1, 1, 96) and np.isfinite(logits).all()


def test_plugin_ort(full_export, tmp_path):
    """With the plugin built, the .ort keeps the ragtop nodes and runs with the plugin."""
    lib = mobile.find_plugin_library()
    if lib is None:
        pytest.skip("the ragtop onnxruntime plugin is not built (plugins/onnxruntime/build/)")
    _, _, out = full_export
    ort_file, _ = mobile.convert_to_ort(out / "model.onnx", tmp_path, custom_op_library=lib)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    ort.InferenceSession(str(ort_file), so)
    assert json.loads((out / "export_report.json").read_text())["ort_format"]["plugin"]["validation"]["passed"]


def test_standard_ops_fp16_and_opset(make_checkpoint, tmp_path, capsys):
    ckpt = make_checkpoint("topk", "uniform")
    out = tmp_path / "std"
    assert (
        main(
            [
                "export",
                str(ckpt),
                str(out),
                "--ops",
                "standard",
                "--dtype",
                "fp16",
                "--opset",
                "20",
                "--max-context",
                "48",
            ]
        )
        == 0
    )
    assert "32/32 match" in capsys.readouterr().out
    g = json.loads((out / "genai_config.json").read_text())
    assert g["ragtop"]["custom_ops"] is None and g["model"]["context_length"] == 48
    assert g["model"]["decoder"]["dtype"] == "fp16" and g["model"]["decoder"]["opset"] == 20
    inputs = {i.name: i.type for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()}
    assert inputs["past_key_values.0.key"] == "tensor(float16)"


@pytest.mark.parametrize(
    "args,message",
    [
        (["{missing}", "{out}"], "checkpoint folder not found"),
        (["{corrupt}", "{out}"], "corrupt checkpoint config"),
        (["{ckpt}", "{out}", "--opset", "9"], "unsupported --opset 9"),
        (["{ckpt}", "{existing}"], "exists and is not empty (use --overwrite)"),
        (["{ckpt}", "{foreign}", "--overwrite"], "does not look like an export folder"),
        (["{ckpt}", "{out}", "--quantize", "int8", "--dtype", "fp16"], "--quantize int8 needs --dtype fp32"),
        (["{ckpt}", "{out}", "--weights", "int4", "--dtype", "fp16"], "--weights int4 runs with fp32 activations"),
        (["{ckpt}", "{out}", "--weights", "int8", "--quantize", "int8"], "does not combine with --weights int8"),
        (["{ckpt}", "{out}", "--weights", "fp16", "--dtype", "fp32"], "--weights fp16 computes in fp16"),
        (["{ckpt}", "{out}", "--rtol", "-1"], "--rtol must be >= 0"),
        (
            ["{ckpt}", "{out}", "--plugin-library", "{missing}", "--ort-format", "--no-validate"],
            "plugin library not found",
        ),
    ],
)
def test_bad_input_is_one_line(make_checkpoint, tmp_path, capsys, args, message):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "model.onnx").write_text("old")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    paths = {
        "missing": tmp_path / "nope",
        "corrupt": corrupt,
        "out": tmp_path / "out",
        "existing": existing,
        "foreign": foreign,
        "ckpt": make_checkpoint("dense", "uniform"),
    }
    assert export_model_main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("ragtop: error:")
    assert (foreign / "notes.txt").is_file()


def test_overwrite_replaces_an_export(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("dense", "uniform")
    out = tmp_path / "out"
    assert export_model_main([str(ckpt), str(out), "--no-validate"]) == 0
    (out / "stale.txt").write_text("x")
    assert export_model_main([str(ckpt), str(out), "--no-validate", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()
    assert "validation" not in json.loads((out / "export_report.json").read_text())
