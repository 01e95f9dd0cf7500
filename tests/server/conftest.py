"""A real uvicorn on port 0 serving tiny exported models, in this process (so a test can
reach the engine, e.g. to slow its runner down and make timing-dependent cases certain)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from ragtop.checkpoint import save_checkpoint
from ragtop.cli import main
from ragtop.model import AttentionConfig, EmbeddingConfig, ModelConfig, Transformer
from ragtop.server import ServerSettings, create_app
from ragtop.server.app import ServerState
from ragtop.server.run import RagtopServer
from ragtop.train.tokenizer import train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "State of the Union: the economy, the budget and the people.",
    "Unicode test: café, naïve, 日本語のテキスト, emoji 🚀 and more.",
    "Numbers 1234567890 and punctuation !?;:,.",
]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}" + EOS + "{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}" + EOS + "assistant\n{% endif %}"
)
CONTEXT = 96


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_checkpoint(root: Path, attention: AttentionConfig) -> Path:
    tok = train_bpe(TEXTS * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=CONTEXT,
        attention=attention,
        embedding=EmbeddingConfig(),
    )
    eos = tok.token_to_id(EOS)
    return save_checkpoint(
        root / "ckpt",
        Transformer(cfg).eval(),
        tok.to_str(),
        generation={"bos_token_id": eos, "eos_token_id": eos, "chat_template": CHAT_TEMPLATE},
    )


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Exported folders: "topk" (custom ragtop ops, plugin or fallback) and "dense"; plus the
    top-k checkpoint itself (torch runner)."""
    out = {}
    for name, attention in (("topk", AttentionConfig(kind="topk", topk=8)), ("dense", AttentionConfig())):
        root = tmp_path_factory.mktemp(name)
        ckpt = tiny_checkpoint(root, attention)
        assert main(["export", str(ckpt), str(root / "onnx"), "--no-validate"]) == 0
        out[name], out[f"{name}-ckpt"] = root / "onnx", ckpt
    return out


@dataclass
class LiveServer:
    url: str
    server: RagtopServer
    thread: threading.Thread
    state: ServerState

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise KeyError(name)

    def stream_in_background(self, body: dict, path: str = "/v1/completions") -> tuple[threading.Thread, list[str]]:
        """POST a streaming request from a thread (started); its non-empty SSE lines collect in the list."""
        events: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", self.url + path, json={**body, "stream": True}, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line)

        thread = threading.Thread(target=stream)
        thread.start()
        return thread, events

    def slow_down(self, seconds: float) -> None:
        """Make every forward pass take at least `seconds` (deterministic timing for tests)."""
        runner = self.state.engine.engine.runner
        forward = runner.forward

        def slow(chunks):
            time.sleep(seconds)
            return forward(chunks)

        runner.forward = slow

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(settings: ServerSettings, exit_on_failure: bool = True, prepare=None, wait: bool = True) -> LiveServer:
    """A real uvicorn serving `create_app(settings, prepare=prepare)`; with `wait`, once the
    model has loaded (or failed to)."""
    app = create_app(settings, prepare=prepare)
    server = RagtopServer(
        app,
        settings,
        "127.0.0.1",
        0,
        log_level="warning",  # what `ragtop serve` runs
        exit_on_failure=exit_on_failure,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(f"http://127.0.0.1:{port}", server, thread, app.state.ragtop)
    if wait:
        wait_until(lambda: httpx.get(live.url + "/health").status_code != 503 or live.state.status == "failed")
    return live


def wait_for_process(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    """Until `ragtop serve` in `proc` answers /health with 200 (its output in the failure if it exits)."""

    def up() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout=timeout)


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, every: float = 0.02) -> Any:
    """Poll `condition` until it is true (returned) or `timeout` seconds pass (an assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)
    return value


def serve_process(
    *args: str, python: str = sys.executable, program: tuple[str, ...] = ("-m", "ragtop.cli"), **popen: Any
) -> tuple[subprocess.Popen, str]:
    """`ragtop serve ARGS --port P` started as a child process on a free port: (process, its
    URL). Its stdout and stderr are one text pipe (shown when `wait_for_process` fails);
    `popen` passes env / cwd."""
    port = free_port()
    cmd = [python, *program, "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    return proc, f"http://127.0.0.1:{port}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a `ragtop serve` started as a process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live(exported) -> Iterator[LiveServer]:
    s = start_server(ServerSettings(model=exported["topk"], served_model_name="tiny", threads=1, max_batch_size=4))
    yield s
    s.stop()


@pytest.fixture
def serve(exported) -> Iterator[Callable[..., LiveServer]]:
    """Start a server with other settings; stopped after the test."""
    started: list[LiveServer] = []

    def start(model: str = "topk", **kw) -> LiveServer:
        kw.setdefault("threads", 1)
        s = start_server(ServerSettings(model=exported[model], **kw))
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
