"""Server settings: the only place that reads environment variables.

Every setting has a `ragtop serve` flag and a `RAGTOP_*` environment variable; a flag given
on the command line wins over the environment, which wins over the default.

    RAGTOP_MODEL=runs/smollm2-onnx RAGTOP_API_KEY=secret ragtop serve --port 8080
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import RagtopError
from ..runtime import MAX_SPECULATIVE_TOKENS

ENV_PREFIX = "RAGTOP_"


@dataclass(frozen=True)
class ServerSettings:
    model: Path | None = None  # exported folder (model.onnx) or checkpoint (model.safetensors)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer KEY`
    served_model_name: str | None = None  # default: the model folder's name
    runner: str = "auto"  # auto | ort | torch
    plugin: bool = True  # register the ragtop onnxruntime plugin when it is built
    threads: int | None = None  # intra-op threads of the model runner
    max_batch_size: int = 8  # sequences running at once (one KV-cache slot each)
    max_waiting: int = 64  # queued requests before HTTP 429
    max_tokens_per_step: int = 512
    prefill_chunk: int = 256  # prompt tokens per sequence per step (long prompts are chunked)
    context_limit: int | None = None  # tokens per sequence; default the model's
    cache_memory_mb: int | None = None  # KV-cache budget; default: a full context per slot
    prefix_caching: bool = True  # reuse the KV of cached prompt prefixes (docs/runtime.md)
    speculative_tokens: int = 0  # self-speculative decoding of greedy requests: drafts per dense pass (0: off)
    max_body_bytes: int = 4 << 20  # larger request bodies get HTTP 413
    shutdown_grace_s: float = 30.0  # on SIGTERM: in-flight requests get this long to finish
    cors_origins: tuple[str, ...] = ()  # no CORS unless origins are named
    log_level: str = "info"
    retry_after_s: int = 1  # Retry-After of a 429
    # -- scale out on Ray Serve (`pip install 'ragtop[ray]'`; docs/scale-out.md) ----------------
    replicas: int | None = None  # fixed replica count; with this or max_replicas, `ragtop serve` runs on Ray
    min_replicas: int | None = None  # autoscaling between min_replicas and max_replicas ...
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # ... on ongoing requests per replica (Ray's default 2)
    max_ongoing_requests: int | None = None  # per replica; default max_batch_size + max_waiting
    max_queued_requests: int | None = None  # in Ray's router (-1: no bound); default replicas x max_ongoing + max_waiting
    ray_address: str | None = None  # join this Ray cluster ("auto", "ray://host:10001"); default: start one here
    replica_metrics_port: int = 0  # each replica's Prometheus endpoint (0: a free port; docs/scale-out.md)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise RagtopError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_waiting", "max_tokens_per_step", "prefill_chunk", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise RagtopError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise RagtopError(f"speculative_tokens must be in 0..{MAX_SPECULATIVE_TOKENS} (0: off), got {self.speculative_tokens}")
        if self.runner not in ("auto", "ort", "torch"):
            raise RagtopError(f"runner must be auto, ort or torch, got {self.runner!r}")
        self._check_scale_out()

    @property
    def scale_out(self) -> bool:
        """Serve on Ray Serve (replicas or autoscaling given) instead of one process."""
        return self.replicas is not None or self.max_replicas is not None

    def _check_scale_out(self) -> None:
        for name, least in (("replicas", 1), ("min_replicas", 0), ("max_replicas", 1), ("max_ongoing_requests", 1),
                            ("max_queued_requests", 1)):
            value = getattr(self, name)
            if value is not None and value < least and not (name == "max_queued_requests" and value == -1):
                raise RagtopError(f"{name} must be >= {least}, got {value}")
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise RagtopError("give either replicas (a fixed count) or min_replicas/max_replicas (autoscaling), not both")
        if self.min_replicas is not None and self.max_replicas is None:
            raise RagtopError("min_replicas needs max_replicas (autoscaling between the two)")
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise RagtopError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise RagtopError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if not 0 <= self.replica_metrics_port <= 65535:
            raise RagtopError(f"replica_metrics_port must be in 0..65535, got {self.replica_metrics_port}")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.resolve().name if self.model else "ragtop"

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
        """Defaults <- RAGTOP_* environment <- overrides (flags given; None means not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        return cls(**values)


def parse_setting(name: str, raw: str) -> Any:
    """A setting given as text (a RAGTOP_* variable, a Ray Serve config's `args`) as its type."""
    by_name = {f.name: f for f in fields(ServerSettings)}
    if name not in by_name:
        raise RagtopError(f"unknown ragtop setting {name!r}; known: {', '.join(sorted(by_name))}")
    return _parse(by_name[name], raw)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = str(f.type)
    name = ENV_PREFIX + f.name.upper()
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("Path"):
            return Path(raw)
        if kind.startswith("tuple"):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        return raw
    except ValueError:
        raise RagtopError(f"environment variable {name}={raw!r} is not a valid {kind.split(' ')[0]}") from None

