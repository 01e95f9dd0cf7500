"""The serving path of an exported model needs no PyTorch (the base install: onnxruntime,
numpy, tokenizers and the HTTP stack). `ragtop serve` runs here in a process where importing
torch, onnx, onnxscript, gguf, safetensors or transformers fails, as in a torch-free venv."""

from __future__ import annotations

import signal
import subprocess
import sys

import openai

from .conftest import free_port, wait_for_process

BLOCKED = ("torch", "onnx", "onnxscript", "gguf", "safetensors", "transformers")
# sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed
PROGRAM = f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r})); from ragtop.cli import main; sys.exit(main())"


def serve_without_torch(model, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROGRAM, "serve", str(model), "--port", str(port), "--threads", "1",
                             "--served-model-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_an_exported_model_serves_without_torch(exported):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_without_torch(exported["topk"], port)
    try:
        wait_for_process(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0.8, seed=3,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out


def test_a_checkpoint_without_torch_is_a_clear_error(exported):
    proc = serve_without_torch(exported["topk-ckpt"], free_port())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "needs PyTorch" in out and "export-model" in out


def test_training_commands_without_torch_say_what_to_install(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROGRAM, "train", "--preset", "tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install 'ragtop[train]'" in proc.stderr
