"""Check a KubeRay RayService manifest for ragtop without a cluster.

    python scripts/validate_rayservice.py docs/kuberay/ragtop-rayservice.yaml [--crd ray.io_rayservices.yaml]

Always: `serveConfigV2` against Ray Serve's own config schema (ray.serve.schema, from the
`ray` extra), and every ragtop application's `args` through `ragtop.server.ray:build` (the
settings and the deployment options they make; the model is not loaded). With --crd (KubeRay's
ray-operator/config/crd/bases/ray.io_rayservices.yaml, which does not install from PyPI): the
whole manifest against the CRD's OpenAPI schema with jsonschema. Exit 1 on the first problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def check(manifest: dict, crd: dict | None = None) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    from ragtop.server.ray import build

    done = []
    if crd is not None:
        import jsonschema

        version = manifest["apiVersion"].split("/")[1]
        (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        jsonschema.validate(manifest, spec["schema"]["openAPIV3Schema"])
        done.append(f"the manifest matches the CRD schema of {crd['metadata']['name']} {version}")
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    done.append(f"serveConfigV2 matches Ray Serve's config schema ({len(config.applications)} application(s))")
    for app in config.applications:
        if app.import_path == "ragtop.server.ray:build":
            deployment = build(app.args or {})._bound_deployment
            auto = deployment._deployment_config.autoscaling_config
            scale = (
                f"{auto.min_replicas}..{auto.max_replicas} replicas (autoscaling, target "
                f"{auto.target_ongoing_requests} ongoing)"
                if auto
                else f"{deployment.num_replicas} replicas"
            )
            done.append(
                f"application {app.name!r}: ragtop settings fine; deployment {deployment.name!r}, {scale}, "
                f"max_ongoing_requests {deployment.max_ongoing_requests}"
            )
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("--crd", type=Path, default=None, help="KubeRay's ray.io_rayservices.yaml")
    a = p.parse_args(argv)
    manifest = yaml.safe_load(a.manifest.read_text())
    crd = yaml.safe_load(a.crd.read_text()) if a.crd else None
    try:
        for line in check(manifest, crd):
            print(f"ok: {line}")
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"invalid: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
