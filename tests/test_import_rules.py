"""DESIGN.md's import rules, for every part of ragtop (docs/architecture.md lists them): model
imports nothing else from ragtop; train/convert/export/runtime may import model; server uses
only runtime's public API; only the CLI imports server or cli; nothing imports loadtests or
tests; loadtests talks to the server over HTTP; the GPU path (ragtop.gpu, Triton) stays off the
torch-free serving path."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ragtop"


def ragtop_imports(path: Path) -> set[str]:
    """Top-level ragtop subpackages/modules imported by a file (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("").parts  # ('ragtop', 'model', 'attention')
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] in ("loadtests", "tests"):
                found.add(parts[0])
            elif parts[0] == "ragtop" and len(parts) > 1:
                found.add(parts[1])
    return found


LAYERS = (
    "model",
    "errors",
    "quant",
    "checkpoint",
    "train",
    "convert",
    "export",
    "gpu",
    "runtime",
    "server",
    "study",
    "bench",
    "default_model",
    "cli",
)
ALLOWED = {  # what each part of ragtop may import (besides itself); docs/architecture.md, "Import rules"
    "__init__": set(),
    "model": set(),
    "errors": set(),
    "quant": {"errors"},
    "checkpoint": {"model", "errors", "quant"},
    "train": {"model", "errors", "checkpoint"},
    "convert": {"model", "errors", "checkpoint", "train", "quant"},
    "export": {"model", "errors", "checkpoint", "train", "runtime", "quant"},
    "gpu": {"model", "errors"},
    "runtime": {"model", "errors", "checkpoint", "export", "gpu"},
    "server": {"runtime", "errors"},
    "study": {"model", "train", "errors"},
    "bench": {"model", "errors", "checkpoint", "quant", "train", "convert", "export", "gpu", "runtime"},
    "default_model": {"errors", "convert", "export"},
    "cli": set(LAYERS) - {"cli"},  # the entry point: parses arguments and calls any part
}


def part_of(f: Path) -> str:
    """ragtop/export/onnx.py -> "export"; ragtop/cli.py -> "cli"."""
    return f.relative_to(PKG).parts[0].removesuffix(".py")


def test_every_part_of_ragtop_has_a_rule():
    parts = {part_of(f) for f in PKG.rglob("*.py")}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED (and docs/architecture.md)"


def test_import_rules():
    violations = []
    for f in PKG.rglob("*.py"):
        part = part_of(f)
        imported = ragtop_imports(f) - {part}
        if "loadtests" in imported or "tests" in imported:
            violations.append(f"{f}: imports {imported & {'loadtests', 'tests'}}")
        if not imported <= ALLOWED.get(part, set()):
            violations.append(f"{f}: {part} may not import {sorted(imported - ALLOWED.get(part, set()))}")
    assert not violations, "\n".join(violations)


def test_scripts_never_import_the_tests():
    """scripts/ may use any of ragtop (one-off measurements), never the test suite."""
    bad = [f"{f}" for f in (PKG.parent / "scripts").rglob("*.py") if "tests" in ragtop_imports(f)]
    assert not bad, bad


def test_server_uses_only_the_runtime_public_api():
    """`from ragtop.runtime import X` (what runtime/__init__.py exports), never its modules."""
    deep = []
    for f in (PKG / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "runtime." in f"{node.module}.":
                mod = node.module.lstrip(".")
                if mod.startswith(("runtime.", "ragtop.runtime.")):
                    deep.append(f"{f}: from {node.module} import ...")
    assert not deep, "\n".join(deep)


def test_loadtests_talk_to_the_server_over_http_only():
    """loadtests may use ragtop's library (checkpoints, convert, export, runtime's bench) but
    drives the server as a process over HTTP: it never imports ragtop.server (nor tests);
    and nothing in ragtop imports loadtests (test_import_rules)."""
    bad = []
    for f in (PKG.parent / "loadtests").rglob("*.py"):
        imported = ragtop_imports(f)
        if imported & {"server", "tests"}:
            bad.append(f"{f}: imports {sorted(imported & {'server', 'tests'})}")
    assert not bad, "\n".join(bad)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports (top level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_gpu_path_is_confined():
    """triton is imported only by ragtop/gpu (and the GPU benchmark); ragtop.gpu only by the
    torch runner and that benchmark; and `import ragtop.gpu` itself pulls in neither triton
    nor torch, so the runner's import of it costs nothing where there is no GPU."""
    bad = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).as_posix()
        if any(m.split(".")[0] == "triton" for m in imported_modules(f)) and not rel.startswith(
            ("gpu/", "bench/gpu.py")
        ):
            bad.append(f"{rel} imports triton")
        if "gpu" in ragtop_imports(f) and not rel.startswith(("gpu/", "bench/gpu.py", "runtime/runners/torch.py")):
            bad.append(f"{rel} imports ragtop.gpu")
    assert not bad, "\n".join(bad)
    code = "import sys, ragtop.gpu; print(sorted({'triton', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
