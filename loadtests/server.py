"""Start and stop `ragtop serve` as a child process for a sweep.

The port is picked by binding port 0 and closing it; readiness is `GET /health` == 200 (503
while the model loads). Peak resident memory is the kernel's high-water mark of the server
process (`VmHWM` in /proc/PID/status), read just before stopping it; the server's own
`ragtop:peak_resident_memory_bytes` gauge is recorded next to it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_bytes(pid: int, field: str) -> int | None:
    """A kB field of /proc/PID/status (VmHWM: peak RSS, VmRSS: current), in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """`ragtop serve MODEL --port N ARGS...` in a child process (its log in `log_path`)."""

    def __init__(
        self,
        model: str | Path | None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        nice: int = 0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "import sys; from ragtop.cli import main; sys.exit(main())", "serve"]
        if model is not None:
            cmd.append(str(model))
        self.cmd = cmd + ["--host", "127.0.0.1", "--port", str(self.port), *(args or [])]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.nice = nice
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 600.0) -> ServerProcess:
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        pre = (lambda: os.nice(self.nice)) if self.nice else None
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=pre)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ragtop serve exited with {self.proc.returncode} before it was ready"
                    + (f" (log: {self.log_path})\n{self.log_tail()}" if self.log_path else "")
                )
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ragtop serve was not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])

    def peak_rss(self) -> int | None:
        return proc_status_bytes(self.proc.pid, "VmHWM") if self.proc else None

    def stop(self, grace: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
