"""A real Prometheus on loopback scraping one ragtop server, when the binary is installed
(Debian: `apt-get install prometheus`; it is never required: without it the sweep computes
the same ratio from two scrapes of /metrics itself, prom.py, and the report says which).

The server's long-context decode throughput, as an operator would query it:

    sum(rate(ragtop:decode_tokens_total[W])) / sum(rate(ragtop:decode_seconds_total[W]))

with W covering the measured window (scrape interval 1 s).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from .server import free_port

QUERY = "sum(rate(ragtop:decode_tokens_total[{w}s])) / sum(rate(ragtop:decode_seconds_total[{w}s]))"


class PrometheusServer:
    def __init__(self, binary: str, target_url: str, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        target = target_url.split("://", 1)[-1].rstrip("/")
        config = folder / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: ragtop\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.cmd = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.log = open(folder / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)

    @classmethod
    def maybe_start(cls, target_url: str, folder: Path, required: bool = False) -> PrometheusServer | None:
        binary = shutil.which("prometheus")
        if binary is None:
            if required:
                raise RuntimeError("--prometheus require: no `prometheus` binary on PATH (apt-get install prometheus)")
            return None
        p = cls(binary, target_url, folder)
        try:
            p.wait_ready()
            p.wait_scraped()
        except Exception:
            p.stop()
            if required:
                raise
            return None
        return p

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus was not ready in time")

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql} | ({"time": f"{at:.3f}"} if at is not None else {})
        r = httpx.get(self.url + "/api/v1/query", params=params, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def wait_scraped(self, timeout: float = 30.0) -> None:
        """Until the first scrape of the target has landed (so the window starts covered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.query('up{job="ragtop"} == 1'):
                return
            time.sleep(0.5)
        raise RuntimeError("prometheus did not scrape the server in time")

    def decode_rate(self, since: float) -> dict[str, Any]:
        """rate() ratio over the window from `since` (time.time(); one scrape interval before
        the run started, after the warm-up) to now (after one more scrape has landed)."""
        time.sleep(2.5)  # let a scrape after the last request land
        at = time.time()
        w = max(2, int(round(at - since)))
        q = QUERY.format(w=w)
        try:
            result = self.query(q, at=at)
            value = float(result[0]["value"][1]) if result else None
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            return {"query": q, "tokens_per_s": None, "error": str(e)}
        return {"query": q, "tokens_per_s": value if value == value else None}  # NaN -> None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
