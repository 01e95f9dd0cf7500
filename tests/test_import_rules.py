"""DESIGN.md's import rules: model imports nothing else from ragtop; train/convert/export/
runtime may import model; server uses only runtime's public API; nothing imports server,
loadtests or tests; the GPU path (ragtop.gpu, Triton) stays off the torch-free serving path."""

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


def test_import_rules():
    allowed = {
        "model": set(),
        "train": {"model", "errors", "checkpoint", "train"},
        "convert": {"model", "errors", "checkpoint", "train", "convert", "quant"},
        "export": {"model", "errors", "checkpoint", "train", "export", "runtime", "quant"},
        "runtime": {"model", "errors", "checkpoint", "export", "runtime", "gpu"},
        "gpu": {"model", "errors", "gpu"},
        "server": {"runtime", "errors", "server"},
        "study": {"model", "train", "errors", "study"},
        "quant": {"errors"},
    }
    violations = []
    for f in PKG.rglob("*.py"):
        sub = f.relative_to(PKG).parts[0]
        imported = ragtop_imports(f) - {sub}
        if f.name == "cli.py" and sub == "cli.py":  # the entry point starts the server
            imported -= {"server"}
        if "server" in imported or "loadtests" in imported or "tests" in imported:
            violations.append(f"{f}: imports {imported & {'server', 'loadtests', 'tests'}}")
        if sub in allowed and not imported <= allowed[sub]:
            violations.append(f"{f}: {sub} may not import {sorted(imported - allowed[sub])}")
    assert not violations, "\n".join(violations)


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
        if any(m.split(".")[0] == "triton" for m in imported_modules(f)) and not rel.startswith(("gpu/", "bench/gpu.py")):
            bad.append(f"{rel} imports triton")
        if "gpu" in ragtop_imports(f) and not rel.startswith(("gpu/", "bench/gpu.py", "runtime/runners/torch.py")):
            bad.append(f"{rel} imports ragtop.gpu")
    assert not bad, "\n".join(bad)
    code = "import sys, ragtop.gpu; print(sorted({'triton', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
