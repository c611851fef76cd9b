"""Choosing a backend, and the layers of the package.

One module chooses (flashsemicrf.backends), the backends import the contract
and never the chooser, the reference is imported by its backend alone, no
module imports itself round a circle, and bench/ uses only public modules.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

import flashsemicrf as F
from conftest import make_case
from flashsemicrf import backends

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flashsemicrf"


def test_auto_picks_the_compiled_kernels_when_present():
    expected = "cpu" if backends.HAS_CPU_KERNELS else "torch"
    assert backends.resolve("t", "auto", torch.device("cpu")).name == expected


def test_available_backends_resolve():
    names = backends.available()
    assert "torch" in names and set(names) <= set(backends.NAMES)
    assert ("cpu" in names) == backends.HAS_CPU_KERNELS
    case = make_case(1, 2, 4, 2, 2)
    for name in backends.available("cpu"):
        assert name in names
        log_z = F.log_partition(**case.kwargs, backend=name)
        assert torch.isfinite(log_z).all(), name


def test_without_the_extension_everything_falls_back_to_the_reference():
    script = (
        "import torch, flashsemicrf as F\n"
        "from flashsemicrf import backends\n"
        "assert not backends.HAS_CPU_KERNELS and 'cpu' not in backends.available(), "
        "backends.available()\n"
        "assert backends.resolve('t', 'auto', 'cpu').name == 'torch'\n"
        "args = torch.randn(2, 5, 3), torch.zeros(3, 3), torch.zeros(2, 3)\n"
        "assert torch.isfinite(F.log_partition(*args)).all()\n"
        "try:\n"
        "    F.log_partition(*args, backend='cpu')\n"
        "except RuntimeError as exc:\n"
        "    assert \"backend 'cpu' is not available\" in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('backend cpu did not raise')\n"
    )
    env = dict(os.environ, FLASHSEMICRF_DISABLE_EXTENSION="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, names: bool = False) -> set[str]:
    """The flashsemicrf modules ``path`` imports (any scope), as dotted names;
    with ``names``, also every name taken from them (``from m import x``: m.x)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flashsemicrf"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base)
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if not module.startswith("flashsemicrf"):
                continue
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                # `from . import x` names a module when x is one.
                is_module = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists() or \
                    (ROOT / candidate.replace(".", "/") / "__init__.py").exists()
                found.add(candidate if is_module or names else module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_layers():
    graph = _graph()
    importers_of_reference = {m for m, deps in graph.items() if "flashsemicrf.reference" in deps}
    assert importers_of_reference == {"flashsemicrf.backends.reference_ops"}
    for module, deps in graph.items():
        if module.startswith("flashsemicrf.backends."):
            assert "flashsemicrf.backends" not in deps, f"{module} imports the chooser"
    # The contract is the bottom layer: it imports no other flashsemicrf module.
    assert graph["flashsemicrf._contract"] == set()


def test_bench_uses_public_modules_only():
    private = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for name in _imports(path, names=True):
            if any(part.startswith("_") for part in name.split(".")[1:]):
                private.append(f"{path.name}: {name}")
    assert not private, private
