"""ragtop's own FastAPI app as a Ray Serve deployment: many replicas behind one OpenAI endpoint.

    ragtop serve MODEL_DIR --replicas 2                       # a local Ray, two replicas
    ragtop serve MODEL_DIR --min-replicas 1 --max-replicas 4  # autoscaling on ongoing requests
    ragtop serve MODEL_DIR --replicas 8 --ray-address auto    # join a running cluster

Each replica is one Ray actor running `create_app(settings)` behind `serve.ingress`: one engine,
`threads` intra-op threads (the deployment reserves as many CPUs), the same routes, SSE, errors
and API key as the single-process server. Ray Serve's HTTP proxy takes the requests and its
default request router sends each to the less loaded of two randomly sampled replicas
(power of two choices on ongoing requests). Backpressure:

- a replica takes at most `max_ongoing_requests` requests, by default what its engine holds
  (`max_batch_size` running + `max_waiting` queued); a full replica refuses a request to the
  router, which tries another one, so no replica's engine overflows while another has room;
- requests that no replica can take wait in the router's queue, at most `max_queued_requests`
  (default: what all replicas take, plus `max_waiting`, since Ray counts a burst as queued
  before it assigns it); past that Ray's proxy answers 429 with Retry-After, which
  ray_proxy.py turns into ragtop's OpenAI error body.

A replica starts answering only once its model is loaded (the lifespan waits for it), and Ray's
health check replaces one whose engine loop stopped. Each replica serves its ragtop metrics,
labelled `replica`, on its own port; `GET /metrics/targets` lists them for Prometheus's
`http_sd_configs` (docs/scale-out.md). The single-process server never imports this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Gauge, Metric, start_http_server

from ..errors import RagtopError
from . import ray_proxy
from .app import create_app
from .metrics import ServerMetrics
from .settings import ServerSettings, parse_setting
from .state import ServerState

try:
    import ray
    from ray import serve
    from ray.experimental import internal_kv
except ImportError as e:  # pragma: no cover - depends on the install
    raise RagtopError("scaling out needs Ray Serve: pip install 'ragtop[ray]'") from e

log = logging.getLogger("ragtop.server")

APP_NAME = "ragtop"
DEPLOYMENT = "ragtop"
REPLICA_HEADER = "x-ragtop-replica"
KV_NAMESPACE = "ragtop"  # Ray's internal KV (GCS): where replicas register their metrics endpoint


# -- the deployment's options, from the one settings object ------------------------------------
def replica_threads(settings: ServerSettings) -> int:
    """Intra-op threads per replica: as given, else this machine's cores shared by the replicas."""
    if settings.threads:
        return settings.threads
    return max(1, (os.cpu_count() or 1) // (settings.replicas or settings.max_replicas or 1))


def max_ongoing(settings: ServerSettings) -> int:
    """Requests a replica takes: by default what its engine holds (running + waiting)."""
    return settings.max_ongoing_requests or settings.max_batch_size + settings.max_waiting


def max_queued(settings: ServerSettings) -> int:
    """Requests Ray's router may hold. Ray counts a burst as queued in the router until it has
    assigned each request to a replica, even while replicas have room; so by default the
    queue holds what every replica can take plus `max_waiting` more (a bound of max_waiting
    alone dropped bursts that the replicas could have served)."""
    replicas = settings.replicas or settings.max_replicas or 1
    return settings.max_queued_requests or replicas * max_ongoing(settings) + settings.max_waiting


def deployment_options(settings: ServerSettings) -> dict[str, Any]:
    """`serve.deployment` options: replicas or autoscaling, CPUs per replica, backpressure."""
    threads = replica_threads(settings)
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": threads},
        "max_ongoing_requests": max_ongoing(settings),
        "max_queued_requests": max_queued(settings),
        "backpressure_config": {"status_code": 429, "retry_after_s": settings.retry_after_s},
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if settings.max_replicas is not None:
        least = 1 if settings.min_replicas is None else settings.min_replicas  # 0: scale to zero when idle
        autoscaling: dict[str, Any] = {"min_replicas": least, "max_replicas": settings.max_replicas}
        if settings.target_ongoing_requests is not None:
            autoscaling["target_ongoing_requests"] = settings.target_ongoing_requests
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = settings.replicas or 1
    return options


# -- one replica -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaRecord:
    """What a replica registers in Ray's KV: where Prometheus scrapes it."""

    app: str
    replica: str
    node: str
    host: str
    port: int
    pid: int

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


class LabelledRegistry:
    """A collector that re-exports a registry's samples with constant labels added."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry, self.labels = registry, labels

    def collect(self):
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield out


def registered_replicas(app: str = APP_NAME, prune: bool = True) -> list[ReplicaRecord]:
    """The replicas that registered a metrics endpoint; with `prune`, those whose endpoint no
    longer answers (a killed replica never unregisters) are dropped from the KV."""
    records = []
    for key in internal_kv._internal_kv_list(f"{app}/", namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw is None:
            continue
        record = ReplicaRecord(**json.loads(raw))
        if prune and not _answers(record.host, record.port):
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
            continue
        records.append(record)
    return sorted(records, key=lambda r: r.replica)


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _ReplicaCount:
    """`ragtop:replicas`: live registered replicas, cached a few seconds (each scrape would
    otherwise probe every replica)."""

    def __init__(self, app: str, ttl_s: float = 5.0) -> None:
        self.app, self.ttl_s, self.at, self.value = app, ttl_s, 0.0, 0

    def __call__(self) -> float:
        if time.monotonic() - self.at > self.ttl_s:
            self.value, self.at = len(registered_replicas(self.app)), time.monotonic()
        return self.value


@serve.ingress()
class RagtopReplica:
    """One replica: `create_app(settings)` with one engine, plus the replica's metrics endpoint.

    `setup(app)` runs once the model is loaded (an extension point: tests slow the runner down
    with it, the way tests/server does in-process)."""

    def __init__(self, settings: ServerSettings, setup: Callable[[FastAPI], None] | None = None) -> None:
        self.settings, self.setup = settings, setup
        self.state: ServerState | None = None
        self.record: ReplicaRecord | None = None
        self.metrics_server = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        ctx = serve.get_replica_context()
        self.replica, app_name = ctx.replica_id.unique_id, ctx.app_name
        metrics = ServerMetrics(self.settings.model_name)
        app = create_app(self.settings, metrics)
        self.state = state = app.state.ragtop
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: FastAPI):
            async with inner(a) as value:
                # Ray routes to a replica once its constructor returns: wait for the model.
                while state.status == "loading":
                    await asyncio.sleep(0.05)
                if state.status != "ready":
                    raise RagtopError(f"replica {self.replica}: the model failed to load: {state.error}")
                if self.setup is not None:
                    self.setup(a)
                self._serve_metrics(metrics, app_name)
                yield value

        app.router.lifespan_context = lifespan

        @app.middleware("http")
        async def tag(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = self.replica
            return response

        @app.get("/metrics/targets", include_in_schema=False)
        async def targets() -> JSONResponse:
            """Prometheus HTTP service discovery: every replica's metrics endpoint."""
            records = await asyncio.to_thread(registered_replicas, app_name)
            return JSONResponse(
                [
                    {
                        "targets": [r.target],
                        "labels": {
                            "replica": r.replica,
                            "ray_node": r.node,
                            "application": r.app,
                            "__meta_ragtop_pid": str(r.pid),
                        },
                    }
                    for r in records
                ]
            )

        return app

    def _serve_metrics(self, metrics: ServerMetrics, app_name: str) -> None:
        # A local Ray behind a loopback proxy keeps its metrics on loopback too; on a cluster
        # Prometheus scrapes each replica at its node's address.
        local = not self.settings.ray_address and self.settings.host in ("127.0.0.1", "localhost", "::1")
        node = "127.0.0.1" if local else ray.util.get_node_ip_address()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(LabelledRegistry(metrics.registry, {"replica": self.replica}))
        Gauge(
            "ragtop:replicas",
            "Live replicas of the deployment (every replica reports it: use max()).",
            registry=registry,
        ).set_function(_ReplicaCount(app_name))
        self.metrics_server, _ = start_http_server(self.settings.replica_metrics_port, node, registry)
        port = self.metrics_server.server_address[1]
        self.record = ReplicaRecord(
            app_name, self.replica, ray.get_runtime_context().get_node_id(), node, port, os.getpid()
        )
        internal_kv._internal_kv_put(
            f"{app_name}/{self.replica}", json.dumps(self.record.__dict__), namespace=KV_NAMESPACE
        )
        log.info("replica %s: metrics on http://%s:%d/metrics", self.replica, node, port)

    async def check_health(self) -> None:
        """Ray restarts a replica whose engine loop stopped."""
        state = self.state
        if state is not None and state.engine is not None and state.engine.error is not None:
            raise RuntimeError(f"the engine loop stopped: {state.engine.error}")

    def __del__(self) -> None:
        if self.record is not None:
            internal_kv._internal_kv_del(f"{self.record.app}/{self.replica}", namespace=KV_NAMESPACE)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def application(settings: ServerSettings, setup: Callable[[FastAPI], None] | None = None):
    """The Ray Serve application of these settings (for `serve.run`)."""
    threads = replica_threads(settings)
    replica_settings = replace(settings, threads=threads)
    return serve.deployment(RagtopReplica).options(**deployment_options(settings)).bind(replica_settings, setup)


def build(args: dict[str, Any]) -> Any:
    """Application builder for Ray Serve config files (`serve run`, `serve deploy`, KubeRay's
    `serveConfigV2`): `import_path: ragtop.server.ray:build`, and `args:` holds ServerSettings
    fields by name (model, replicas, max_batch_size, ...) over the RAGTOP_* environment."""
    overrides: dict[str, Any] = {}
    for name, value in args.items():  # `serve run ... replicas=2` gives text, a YAML config types
        if isinstance(value, str) or name == "model":
            value = parse_setting(name, str(value))
        elif name == "cors_origins":
            value = tuple(value)
        overrides[name] = value
    unknown = sorted(set(overrides) - {f.name for f in fields(ServerSettings)})
    if unknown:
        raise RagtopError(f"unknown ragtop setting(s) in args: {', '.join(unknown)}")
    return application(ServerSettings.load(overrides))


# -- `ragtop serve --replicas N` -----------------------------------------------------------------
def start(
    settings: ServerSettings,
    setup: Callable[[FastAPI], None] | None = None,
    num_cpus: int | None = None,
    blocking_timeout_s: float = 600.0,
) -> str:
    """Start (or join) Ray, start Serve's proxy on settings.host:port and deploy ragtop; returns
    the base URL once every replica is up."""
    # Ray's proxies load ragtop's OpenAI-error middleware from this variable (ray_proxy.py); a
    # Ray started here inherits it, a cluster must set it where it starts Ray (docs/scale-out.md).
    os.environ.setdefault(ray_proxy.ENV, ray_proxy.CALLBACK)
    # Serve kills a proxy that is not ready within 3 x 5 s; on a busy machine starting it takes
    # longer (seen on the 2-core machine of docs/scale-out.md), and the deployment then fails.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address, include_dashboard=False, logging_level=logging.WARNING)
        else:  # a new Ray of this machine only, never one `ray start` left running (its ports: docs/scale-out.md)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, setup), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def stop(started_ray: bool = True) -> None:
    """Tear down what `start` made: Serve and Ray when Ray was started here, else only the app."""
    if started_ray:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP_NAME)


def serve_forever(settings: ServerSettings) -> int:
    """`ragtop serve MODEL_DIR --replicas N`: deploy, then wait for SIGINT/SIGTERM and tear down."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = deployment_options(settings)
    scale = options.get("autoscaling_config") or {"replicas": options["num_replicas"]}
    log.info(
        "Ray Serve: %s, %d thread(s) per replica, max_ongoing_requests %d per replica",
        scale,
        replica_threads(settings),
        options["max_ongoing_requests"],
    )
    try:
        url = start(settings)
    except Exception as e:  # noqa: BLE001 - a failed deploy (e.g. the model does not load)
        log.error("the deployment failed: %s", e)
        stop(started_ray=not settings.ray_address)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: done.set())
    log.info(
        "serving %s as %r on %s (OpenAI API under /v1; replica metrics: %s/metrics/targets)",
        settings.model,
        settings.model_name,
        url,
        url,
    )
    done.wait()
    log.info("shutting down: in-flight requests get %.0f s", settings.shutdown_grace_s)
    stop(started_ray=not settings.ray_address)
    return 0
