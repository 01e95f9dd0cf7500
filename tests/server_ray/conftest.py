"""A real local Ray (2 CPUs, loopback, no dashboard) running ragtop's app as a Ray Serve
deployment of 2 replicas over a tiny exported model; torn down after the module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server.conftest import free_port, tiny_checkpoint  # noqa: E402 - tests/ is on sys.path (rootdir conftest)
from server.conftest import wait_until as wait_for  # noqa: E402

from ragtop.cli import main  # noqa: E402
from ragtop.model import AttentionConfig  # noqa: E402
from ragtop.server import ServerSettings  # noqa: E402

STEP_S = 0.02  # every forward pass takes at least this long: requests overlap for certain


def slow_runner(app, seconds: float = STEP_S) -> None:
    """Runs inside each replica once its model is loaded (this module is pickled by value)."""
    import time as _time

    runner = app.state.ragtop.engine.engine.runner
    forward = runner.forward

    def slow(chunks):
        _time.sleep(seconds)
        return forward(chunks)

    runner.forward = slow


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-topk")
    ckpt = tiny_checkpoint(root, AttentionConfig(kind="topk", topk=8))
    assert main(["export", str(ckpt), str(root / "onnx"), "--no-validate"]) == 0
    return root / "onnx"


@dataclass
class RayService:
    url: str
    settings: ServerSettings

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def replicas(self):
        from ragtop.server.ray import registered_replicas

        return registered_replicas()


def wait_until(condition, timeout: float = 60.0, every: float = 0.1):
    """tests/server's, with Ray's slower pace."""
    return wait_for(condition, timeout, every)


@pytest.fixture(scope="module")
def ray_service(tiny_model) -> Iterator[RayService]:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ragtop[ray]')")
    from ray import cloudpickle

    from ragtop.server import ray as ragtop_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import the tests

    settings = ServerSettings(
        model=tiny_model,
        served_model_name="tiny",
        port=free_port(),
        replicas=2,
        threads=1,
        max_batch_size=2,
        max_waiting=2,
        api_key="sekrit",
        shutdown_grace_s=2,
    )
    try:
        url = ragtop_ray.start(settings, setup=slow_runner, num_cpus=2)
        service = RayService(url, settings)
        wait_until(lambda: len(service.replicas()) == 2)
        yield service
    finally:
        ragtop_ray.stop()
