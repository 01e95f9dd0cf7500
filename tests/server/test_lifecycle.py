"""Loading, the runners a server can sit on, settings, failed loads and graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from ragtop.errors import RagtopError
from ragtop.runtime.plugin import plugin_library_path
from ragtop.server import ServerSettings

from .conftest import free_port, serve_process, start_server, wait_for_process, wait_until


def answer(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    return (
        client.completions.create(
            model=client.models.list().data[0].id,
            prompt="The quick",
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )


@pytest.mark.parametrize("plugin", [True, False], ids=["plugin", "fallback"])
def test_topk_export_serves_with_and_without_the_plugin(serve, plugin):
    if plugin and plugin_library_path() is None:
        pytest.skip("the ragtop plugin is not built here (make install builds it)")
    s = serve(plugin=plugin)
    assert s.state.engine.engine.runner.plugin is plugin
    assert answer(s.url)


def test_runners_agree(serve):
    """The same top-k weights: exported (plugin or fallback) and the torch checkpoint give the same greedy text."""
    texts = {answer(serve(model=m, plugin=p).url) for m, p in (("topk", True), ("topk", False), ("topk-ckpt", True))}
    assert len(texts) == 1


def test_dense_export_serves(serve):
    assert answer(serve(model="dense").url)


def test_failed_load_is_503_with_the_reason(tmp_path):
    s = start_server(ServerSettings(model=tmp_path / "nowhere"), exit_on_failure=False)
    try:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "nowhere" in r.json()["error"]
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_settings_from_environment_and_flags(tmp_path):
    env = {
        "RAGTOP_PORT": "9001",
        "RAGTOP_API_KEY": "k",
        "RAGTOP_PLUGIN": "false",
        "RAGTOP_CORS_ORIGINS": "http://a, http://b",
        "RAGTOP_MODEL": str(tmp_path),
        "RAGTOP_SHUTDOWN_GRACE_S": "2.5",
    }
    s = ServerSettings.load({"port": 9002, "host": None}, env)
    assert (s.port, s.api_key, s.plugin, s.cors_origins, s.model, s.host, s.shutdown_grace_s) == (
        9002,
        "k",
        False,
        ("http://a", "http://b"),
        tmp_path,
        "127.0.0.1",
        2.5,
    )
    assert s.model_name == tmp_path.name
    with pytest.raises(RagtopError, match="RAGTOP_MAX_BATCH_SIZE"):
        ServerSettings.load({}, {"RAGTOP_MAX_BATCH_SIZE": "lots"})
    with pytest.raises(RagtopError, match="max_waiting"):
        ServerSettings.load({"max_waiting": 0}, {})


def test_no_cors_unless_asked(serve):
    s = serve()
    r = httpx.options(
        s.url + "/v1/completions", headers={"Origin": "http://evil", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers
    s2 = serve(cors_origins=("http://app",))
    r = httpx.options(
        s2.url + "/v1/completions", headers={"Origin": "http://app", "Access-Control-Request-Method": "POST"}
    )
    assert r.headers["access-control-allow-origin"] == "http://app"


def test_graceful_shutdown_finishes_in_flight_requests(serve):
    s = serve(shutdown_grace_s=30)
    s.slow_down(0.02)
    t, events = s.stream_in_background({"prompt": "The", "max_tokens": 40, "ignore_eos": True})
    wait_until(lambda: s.metric("ragtop:num_requests_running") == 1)
    s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls
    t.join(60)
    assert events[-1] == "data: [DONE]" and len(events) > 10
    s.thread.join(30)
    assert not s.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")


def test_ragtop_serve_process_answers_and_exits_on_sigterm(exported):
    env = {**os.environ, "RAGTOP_LOG_LEVEL": "info"}
    proc, url = serve_process(str(exported["topk"]), "--threads", "1", "--served-model-name", "tiny", env=env)
    try:
        wait_for_process(proc, url)
        prompt = "a secret prompt text"
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out  # a requested shutdown that completes is a success
    assert "Application shutdown complete" in out and "Traceback" not in out
    assert "secret prompt" not in out  # no prompt text in the logs at INFO
    assert "request cmpl-" in out


def test_ragtop_serve_exits_1_when_the_model_cannot_load(tmp_path):
    (tmp_path / "model.onnx").write_text("not onnx")
    (tmp_path / "genai_config.json").write_text(json.dumps({"bad": True}))
    proc = subprocess.run(
        [sys.executable, "-m", "ragtop.cli", "serve", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "failed to load" in proc.stderr


def test_default_model_dirs_live_in_the_data_folder(tmp_path):
    from ragtop.default_model import default_model_dirs

    ckpt, onnx_dir = default_model_dirs(tmp_path)
    assert ckpt.parent == onnx_dir.parent == Path(tmp_path) / "models"


def test_port_answers_503_loading_with_what_it_does_while_the_model_is_prepared(exported):
    """`prepare` (the default model's first-run import/export) runs after the port opens: /health
    and the API answer 503 `loading` naming the stage, then the prepared folder is served."""
    stage_reported, go_on = threading.Event(), threading.Event()

    def prepare(progress) -> Path:
        progress("first run: exporting the checkpoint to ONNX")
        stage_reported.set()
        assert go_on.wait(60), "the test never let preparation finish"
        return exported["topk"]

    # no model in the settings: `prepare` gives it
    live = start_server(ServerSettings(served_model_name="tiny", threads=1), prepare=prepare, wait=False)
    try:
        assert stage_reported.wait(30)
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503
        assert health.json() == {"status": "loading", "detail": "first run: exporting the checkpoint to ONNX"}
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "still loading (first run: exporting the checkpoint to ONNX)" in r.json()["error"]["message"]
        assert httpx.get(live.url + "/v1/models").status_code == 503
        go_on.set()
        wait_until(lambda: httpx.get(live.url + "/health").status_code == 200)
        assert httpx.get(live.url + "/health").json() == {"status": "ready"}
        (card,) = httpx.get(live.url + "/v1/models").json()["data"]
        assert card["id"] == "tiny" and card["root"] == str(exported["topk"])
        assert httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        go_on.set()
        live.stop()


def test_failed_preparation_is_503_failed_with_the_reason():
    def prepare(progress) -> Path:
        progress("first run: importing SmolLM2")
        raise RagtopError("the GGUF is missing")

    live = start_server(ServerSettings(threads=1), prepare=prepare, exit_on_failure=False)
    try:
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503
        assert health.json() == {"status": "failed", "error": "the model failed to load: the GGUF is missing"}
    finally:
        live.stop()


def test_ragtop_serve_without_a_model_opens_the_port_while_it_exports_the_default_model(exported, tmp_path):
    """`ragtop serve` with no MODEL_DIR on a first run: the default model's checkpoint is in the
    data folder (here the tiny one, so the run takes seconds) but not its export. The port
    answers 503 `loading` saying it is exporting, then serves the export under the default name."""
    import shutil

    from ragtop.default_model import SERVED_NAME, default_model_dirs

    ckpt, onnx_dir = default_model_dirs(tmp_path)
    shutil.copytree(exported["topk-ckpt"], ckpt)
    env = {**os.environ, "RAGTOP_DATA_DIR": str(tmp_path), "RAGTOP_THREADS": "1"}
    env.pop("RAGTOP_MODEL", None)
    proc, url = serve_process(env=env)
    seen: list[dict] = []

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        try:
            r = httpx.get(url + "/health")
        except httpx.TransportError:
            return False
        if r.status_code == 503:
            seen.append(r.json())
        return r.status_code == 200

    try:
        wait_until(ready, timeout=900)  # a hang guard: preparing takes ~1 min, far longer on a loaded machine
        assert (onnx_dir / "model.onnx").is_file()
        exporting = [s for s in seen if "exporting" in s.get("detail", "")]
        assert exporting and exporting[0]["status"] == "loading" and "to ONNX" in exporting[0]["detail"], seen
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [SERVED_NAME]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
