"""The scale-out settings and the deployment options they make; the single-process server
never imports Ray. Fast: no Ray is started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ragtop.errors import RagtopError
from ragtop.server import ServerSettings


def test_single_process_server_does_not_import_ray():
    code = (
        "import sys, ragtop.cli, ragtop.server, ragtop.server.run, ragtop.server.app; "
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scale_out_settings_from_flags_and_environment():
    assert not ServerSettings().scale_out
    s = ServerSettings.load({"replicas": 3}, environ={"RAGTOP_MAX_ONGOING_REQUESTS": "9"})
    assert s.scale_out and s.replicas == 3 and s.max_ongoing_requests == 9
    auto = ServerSettings.load(
        environ={
            "RAGTOP_MIN_REPLICAS": "1",
            "RAGTOP_MAX_REPLICAS": "4",
            "RAGTOP_TARGET_ONGOING_REQUESTS": "2.5",
            "RAGTOP_RAY_ADDRESS": "auto",
        }
    )
    assert auto.scale_out and auto.target_ongoing_requests == 2.5 and auto.ray_address == "auto"
    for bad in (
        {"replicas": 2, "max_replicas": 4},
        {"min_replicas": 1},
        {"min_replicas": 5, "max_replicas": 2},
        {"replicas": 0},
        {"max_queued_requests": 0},
        {"target_ongoing_requests": 0.0},
    ):
        with pytest.raises(RagtopError):
            ServerSettings(**bad)
    assert ServerSettings(replicas=1, max_queued_requests=-1).max_queued_requests == -1


def test_deployment_options():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ragtop[ray]')")
    from ragtop.server.ray import deployment_options, replica_threads

    s = ServerSettings(model=Path("m"), replicas=2, threads=1, max_batch_size=4, max_waiting=8)
    o = deployment_options(s)
    assert o["num_replicas"] == 2 and o["ray_actor_options"] == {"num_cpus": 1}
    assert o["max_ongoing_requests"] == 4 + 8 and o["max_queued_requests"] == 2 * (4 + 8) + 8
    assert o["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}
    auto = deployment_options(ServerSettings(max_replicas=4, target_ongoing_requests=3, max_queued_requests=10))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    assert "num_replicas" not in auto and auto["max_queued_requests"] == 10
    assert deployment_options(ServerSettings(min_replicas=0, max_replicas=2))["autoscaling_config"]["min_replicas"] == 0
    assert replica_threads(ServerSettings(replicas=64)) == 1


def test_kuberay_manifest_and_app_builder():
    """docs/kuberay/ragtop-rayservice.yaml: Ray Serve's schema accepts its serveConfigV2, and
    ragtop.server.ray:build turns its args into the deployment (scripts/validate_rayservice.py;
    the CRD check needs KubeRay's CRD file, which does not install from PyPI)."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ragtop[ray]')")
    import yaml

    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "scripts"))
    try:
        from validate_rayservice import check
    finally:
        sys.path.pop(0)
    manifest = yaml.safe_load((repo / "docs/kuberay/ragtop-rayservice.yaml").read_text())
    lines = check(manifest)
    assert "1..4 replicas (autoscaling, target 4.0 ongoing)" in lines[-1] and "max_ongoing_requests 72" in lines[-1]
    from ragtop.server.ray import build

    with pytest.raises(RagtopError, match="max_wating"):
        build({"model": "m", "max_wating": 3})
    # `serve run ragtop.server.ray:build model=m replicas=3 threads=1` passes text
    text = build({"model": "m", "replicas": "3", "threads": "1", "target_ongoing_requests": "2"})._bound_deployment
    assert text.num_replicas == 3 and text.ray_actor_options["num_cpus"] == 1
