"""The serving path of an exported model needs no PyTorch (the base install: onnxruntime,
numpy, tokenizers and the HTTP stack). `ragtop serve` runs here in a process where importing
torch, onnx, onnxscript, gguf, safetensors or transformers fails, and in a fresh venv holding
only the base install."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from .conftest import serve_process, wait_for_process

BLOCKED = ("torch", "onnx", "onnxscript", "gguf", "safetensors", "transformers")
# sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed
PROGRAM = f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); from ragtop.cli import main; sys.exit(main())"


TINY = ("--threads", "1", "--served-model-name", "tiny")


def test_an_exported_model_serves_without_torch(exported):
    proc, url = serve_process(str(exported["topk"]), *TINY, program=("-c", PROGRAM))
    try:
        wait_for_process(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(
            model="tiny", prompt="The quick", max_tokens=5, temperature=0.8, seed=3, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == 5
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out


def test_a_checkpoint_without_torch_is_a_clear_error(exported):
    proc, _ = serve_process(str(exported["topk-ckpt"]), *TINY, program=("-c", PROGRAM))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "needs PyTorch" in out and "export-model" in out


def test_training_commands_without_torch_say_what_to_install(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, "train", "--preset", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "pip install 'ragtop[train]'" in proc.stderr


def base_install(venv: Path) -> Path:
    """A fresh venv holding ragtop and exactly the closure of pyproject's base `dependencies`
    (no extras), linked from this environment's installed distributions (no network: the
    files are the ones pip installed here). A dependency missing from pyproject fails here."""
    import importlib.metadata as metadata
    import tomllib
    import venv as venv_module

    from packaging.requirements import Requirement

    venv_module.create(venv, with_pip=False)
    site = next((venv / "lib").glob("python3*/site-packages"))
    repo = Path(__file__).resolve().parents[2]
    wanted = [Requirement(r) for r in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while wanted:
        req = wanted.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        dist = metadata.distribution(req.name)
        for top in {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
            if top != "__pycache__" and not (site / top).exists():
                (site / top).symlink_to(Path(dist.locate_file(top)))
        wanted += [Requirement(r) for r in dist.requires or ()]
    (site / "ragtop").symlink_to(repo / "ragtop")
    return venv / "bin" / "python"


def test_the_base_install_in_a_fresh_venv_serves_without_torch(exported, tmp_path):
    python = base_install(tmp_path / "venv")
    for module in ("torch", "onnx", "transformers"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    proc, url = serve_process(str(exported["topk"]), *TINY, python=str(python), cwd=tmp_path)
    try:
        wait_for_process(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(
            model="tiny", prompt="The quick", max_tokens=4, temperature=0.7, seed=1, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == 4
        assert httpx.get(url + "/docs").status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
