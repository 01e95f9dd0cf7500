"""Server settings: the only place that reads environment variables.

Every setting has a `ragtop serve` flag and a `RAGTOP_*` environment variable; a flag given
on the command line wins over the environment, which wins over the default.

    RAGTOP_MODEL=runs/smollm2-onnx RAGTOP_API_KEY=secret ragtop serve --port 8080
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import RagtopError
from ..runtime import MAX_SPECULATIVE_TOKENS, SERVED_DENSE_DECODE_TOKENS, SERVED_DENSE_PREFILL_TOKENS

ENV_PREFIX = "RAGTOP_"
FLAG_GROUPS = {
    "ray": (
        "scale out on Ray Serve",
        "With --replicas or --max-replicas the same app runs as a Ray Serve "
        "deployment, one engine per replica (needs `pip install 'ragtop[ray]'`; docs/scale-out.md)",
    )
}


def setting(default: Any, help: str, *, default_text: str | None = None, **flag: Any) -> Any:
    """A settings field with what its `ragtop serve` flag needs: `help`; optionally `flag` (the
    flag's name when it is not the field's), `choices`, `minimum` (1: a positive integer),
    `group` (a key of FLAG_GROUPS), and `default_text` (the default in words)."""
    return field(default=default, metadata={"help": help, "default_text": default_text, **flag})


@dataclass(frozen=True)
class ServerSettings:
    """Every setting: a field here, a `ragtop serve` flag (made by `add_arguments`) and a
    RAGTOP_<NAME> environment variable (read by `load`)."""

    model: Path | None = setting(
        None,
        "exported folder (model.onnx) or checkpoint",
        default_text="the default model, SmolLM2, prepared on first run",
    )
    host: str = setting("127.0.0.1", "the address to listen on")
    port: int = setting(8000, "0 picks a free port")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize")
    served_model_name: str | None = setting(None, "the model id clients send", default_text="the folder's name")
    runner: str = setting("auto", "ort (an exported folder) or torch (a checkpoint)", choices=("auto", "ort", "torch"))
    plugin: bool = setting(True, "run the standard-op fallbacks even when the ragtop plugin is built")
    threads: int | None = setting(None, "intra-op threads of the model runner", minimum=1)
    max_batch_size: int = setting(8, "sequences running at once (one KV-cache slot each)", minimum=1)
    max_waiting: int = setting(64, "queued requests before HTTP 429", minimum=1)
    max_tokens_per_step: int = setting(512, "prefill + decode tokens per engine step", minimum=1)
    prefill_chunk: int = setting(256, "prompt tokens per sequence per step (long prompts are chunked)", minimum=1)
    context_limit: int | None = setting(None, "tokens per sequence", minimum=1, default_text="the model's")
    cache_memory_mb: int | None = setting(None, "KV-cache budget", minimum=1, default_text="a full context per slot")
    kv_cache: str = setting(
        "auto",
        "KV-cache layout: paged (blocks allocated as sequences grow, preemption when they run out; "
        "needs an export with --paged-kv), contiguous (a whole context reserved per slot), or auto: "
        "paged when the exported folder has a paged graph (docs/runtime.md)",
        choices=("auto", "paged", "contiguous"),
    )
    prefix_caching: bool = setting(
        True, "compute every prompt in full instead of reusing cached prefixes (docs/runtime.md)"
    )
    speculative_tokens: int = setting(
        0,
        "self-speculative decoding by default: the sparse model drafts this many tokens, "
        "one dense pass verifies them; greedy output identical to dense, sampled output "
        "distributed as dense's (0: off; a request's num_speculative_tokens overrides it; docs/server.md)",
    )
    dense_prefill_tokens: int = setting(
        SERVED_DENSE_PREFILL_TOKENS,
        "a sparse model attends densely to prompt chunks whose context ends at or below this many "
        "tokens (where dense prefill is as fast or faster, with dense quality; 0: prompts attend "
        "sparsely; docs/runtime.md)",
    )
    dense_decode_tokens: int = setting(
        SERVED_DENSE_DECODE_TOKENS,
        "a sparse model decodes densely while the context is at most this many tokens (where sparse "
        "attention saves no time; 0: always sparse; docs/runtime.md)",
    )
    max_body_bytes: int = setting(4 << 20, "larger request bodies get HTTP 413", minimum=1, default_text="4 MiB")
    shutdown_grace_s: float = setting(30.0, "on SIGTERM: seconds in-flight requests may take to finish")
    cors_origins: tuple[str, ...] = setting(
        (), "allowed CORS origin (repeatable)", flag="cors-origin", default_text="none"
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    retry_after_s: int = setting(1, "the Retry-After of a 429 or a 503 while loading or draining", minimum=1)
    # -- scale out on Ray Serve (`pip install 'ragtop[ray]'`; docs/scale-out.md) ----------------
    replicas: int | None = setting(
        None,
        "a fixed number of replicas; with this or --max-replicas `ragtop serve` runs on Ray",
        minimum=1,
        group="ray",
    )
    min_replicas: int | None = setting(None, "autoscaling: at least this many", group="ray", default_text="1")
    max_replicas: int | None = setting(None, "autoscaling: at most this many", minimum=1, group="ray")
    target_ongoing_requests: float | None = setting(
        None, "autoscaling target: ongoing requests per replica", group="ray", default_text="Ray's, 2"
    )
    max_ongoing_requests: int | None = setting(
        None, "requests a replica takes at once", minimum=1, group="ray", default_text="max-batch-size + max-waiting"
    )
    max_queued_requests: int | None = setting(
        None,
        "requests waiting in Ray's router when every replica is full, before 429 (-1: no bound)",
        group="ray",
        default_text="replicas x max-ongoing-requests + max-waiting",
    )
    ray_address: str | None = setting(
        None, "join this Ray cluster ('auto', ray://HOST:10001)", group="ray", default_text="a local Ray"
    )
    replica_metrics_port: int = setting(0, "each replica's Prometheus port (0: a free one)", group="ray")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise RagtopError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_waiting", "max_tokens_per_step", "prefill_chunk", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise RagtopError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dense_prefill_tokens", "dense_decode_tokens"):
            if getattr(self, name) < 0:
                raise RagtopError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise RagtopError(
                f"speculative_tokens must be in 0..{MAX_SPECULATIVE_TOKENS} (0: off), got {self.speculative_tokens}"
            )
        if self.runner not in ("auto", "ort", "torch"):
            raise RagtopError(f"runner must be auto, ort or torch, got {self.runner!r}")
        self._check_scale_out()

    @property
    def scale_out(self) -> bool:
        """Serve on Ray Serve (replicas or autoscaling given) instead of one process."""
        return self.replicas is not None or self.max_replicas is not None

    def _check_scale_out(self) -> None:
        for name, least in (
            ("replicas", 1),
            ("min_replicas", 0),
            ("max_replicas", 1),
            ("max_ongoing_requests", 1),
            ("max_queued_requests", 1),
        ):
            value = getattr(self, name)
            if value is not None and value < least and not (name == "max_queued_requests" and value == -1):
                raise RagtopError(f"{name} must be >= {least}, got {value}")
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise RagtopError(
                "give either replicas (a fixed count) or min_replicas/max_replicas (autoscaling), not both"
            )
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
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerSettings:
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


# -- the `ragtop serve` flags, one per field ----------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per settings field (`--max-batch-size` for max_batch_size; `--no-plugin` for a
    setting that is on by default; MODEL_DIR positional). Every flag defaults to None, "not
    given", so that `load` lets the environment and then the field's default decide."""
    groups = {key: p.add_argument_group(title, description) for key, (title, description) in FLAG_GROUPS.items()}
    for f in fields(ServerSettings):
        target = groups[f.metadata["group"]] if f.metadata.get("group") else p
        _add_flag(target, f)


def _add_flag(p, f: dataclasses.Field) -> None:
    meta, kind = f.metadata, _kind(f)
    default = meta.get("default_text") or (None if f.default is None or isinstance(f.default, bool) else f.default)
    help = meta["help"] + (f" (default: {default})" if default is not None else "")
    name = "--" + meta.get("flag", f.name).replace("_", "-")
    if f.name == "model":
        p.add_argument(f.name, type=Path, nargs="?", default=None, help=help)
    elif kind == "bool":  # a switch that turns the default over
        flag = f"--no-{f.name.replace('_', '-')}" if f.default else name
        p.add_argument(flag, dest=f.name, action="store_const", const=not f.default, default=None, help=help)
    elif kind == "tuple":
        p.add_argument(name, dest=f.name, action="append", default=None, help=help)
    else:
        convert = {"int": _int_at_least(meta.get("minimum")), "float": float, "Path": Path}.get(kind, str)
        p.add_argument(name, dest=f.name, type=convert, choices=meta.get("choices"), default=None, help=help)


def from_arguments(a: argparse.Namespace) -> dict[str, Any]:
    """The flags given (the others None), as `load`'s overrides."""
    given = {f.name: getattr(a, f.name) for f in fields(ServerSettings)}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in given.items()}


def _kind(f: dataclasses.Field) -> str:
    """The field's type by its leading name ("int | None" -> "int")."""
    return str(f.type).split("[")[0].split(" ")[0]


def _int_at_least(minimum: int | None) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if minimum is not None and v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    parse.__name__ = "int"  # argparse names the type in its error messages
    return parse
