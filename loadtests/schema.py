"""The shape of the JSON documents the harness writes, checked without extra dependencies.

A spec is a dict of key -> type (or tuple of types, or a nested spec dict, or [spec] for a
list of items); `None` in a tuple allows null. `validate(doc)` returns a list of problems
(empty when the document conforms); keys beyond the spec are allowed.
"""

from __future__ import annotations

from typing import Any

from . import SCHEMA

NUM = (int, float)
OPT_NUM = (int, float, type(None))
LAT = {"count": int, "mean": OPT_NUM, "median": OPT_NUM, "std": OPT_NUM, "min": OPT_NUM, "max": OPT_NUM}

SUMMARY = {
    "requests": int,
    "completed": int,
    "failed": int,
    "failed_by_status": dict,
    "rejected_429": int,
    "duration_s": NUM,
    "total_prompt_tokens": int,
    "total_output_tokens": int,
    "request_throughput": OPT_NUM,
    "output_throughput": OPT_NUM,
    "total_token_throughput": OPT_NUM,
    "slos_s": dict,
    "good_requests": (int, type(None)),
    "goodput": OPT_NUM,
    "ttft_s": LAT,
    "tpot_s": LAT,
    "itl_s": LAT,
    "e2e_s": LAT,
    "decode_tokens_per_s": LAT,
}

REQUEST = {
    "index": int,
    "prompt_tokens": int,
    "max_tokens": int,
    "sent": NUM,
    "ok": bool,
    "status": int,
    "error": str,
    "output_tokens": int,
    "ttft": OPT_NUM,
    "tpot": OPT_NUM,
    "e2e": OPT_NUM,
    "itl": list,
}

RUN = {
    "schema": str,
    "kind": str,
    "label": str,
    "started_at": NUM,
    "model": str,
    "config": dict,
    "machine": dict,
    "summary": SUMMARY,
    "server": (dict, type(None)),
    "notes": list,
    "requests": [REQUEST],
}

CONTEXT_ROW = {
    "model": str,
    "mode": str,
    "context": int,
    "new_tokens": int,
    "ok": bool,
    "error": (str, type(None)),
    "decode_tokens_per_s": OPT_NUM,
    "ttft_s": OPT_NUM,
    "peak_rss_bytes": OPT_NUM,
    "speedup_vs_dense": OPT_NUM,
    "bytes_per_token": OPT_NUM,
    "bandwidth_bound_pct": OPT_NUM,
    "server_decode_tokens_per_s": OPT_NUM,
}

CONTEXT_SWEEP = {
    "schema": str,
    "kind": str,
    "started_at": NUM,
    "finished_at": NUM,
    "machine": dict,
    "command": str,
    "settings": dict,
    "bandwidth": (dict, type(None)),
    "rows": [CONTEXT_ROW],
    "notes": list,
}

CONCURRENCY_ROW = {"clients": int, "summary": SUMMARY, "server": (dict, type(None))}

CONCURRENCY_SWEEP = {
    "schema": str,
    "kind": str,
    "started_at": NUM,
    "finished_at": NUM,
    "machine": dict,
    "command": str,
    "settings": dict,
    "levels": [CONCURRENCY_ROW],
    "first_429_clients": (int, type(None)),
    "notes": list,
}

SPECS = {"run": RUN, "context-sweep": CONTEXT_SWEEP, "concurrency-sweep": CONCURRENCY_SWEEP}


def check(value: Any, spec: Any, path: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{path}.{key}: missing")
            else:
                check(value[key], sub, f"{path}.{key}", problems)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            check(item, spec[0], f"{path}[{i}]", problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        # bool is an int in Python: do not let True pass for a number unless bool is allowed
        if isinstance(value, bool) and bool not in types:
            problems.append(f"{path}: expected {_names(types)}, got bool")
        elif not isinstance(value, types):
            problems.append(f"{path}: expected {_names(types)}, got {type(value).__name__}")


def _names(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def validate(doc: Any) -> list[str]:
    """Problems with a result document (empty list: it conforms to its kind's schema)."""
    if not isinstance(doc, dict):
        return ["$: expected an object"]
    if doc.get("schema") != SCHEMA:
        return [f"$.schema: expected {SCHEMA!r}, got {doc.get('schema')!r}"]
    spec = SPECS.get(doc.get("kind"))
    if spec is None:
        return [f"$.kind: expected one of {sorted(SPECS)}, got {doc.get('kind')!r}"]
    problems: list[str] = []
    check(doc, spec, "$", problems)
    return problems
