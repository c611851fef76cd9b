"""Build helpers of the tests: the CUDA binary tools, and `make wheel`."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, or the copy Triton ships; None without either."""
    return cuda_tool("cuobjdump")


def cuda_tool(name: str) -> str | None:
    """A CUDA binary tool (cuobjdump, nvdisasm, ptxas): on the PATH, in the
    CUDA toolkit, or the copy Triton ships; None without any."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        roots.append(os.path.join(spec.submodule_search_locations[0], "backends", "nvidia"))
    for root in filter(None, roots):
        path = os.path.join(root, "bin", name)
        if os.access(path, os.X_OK):
            return path
    return None


def build_wheel(out: Path) -> Path:
    """`make wheel` into ``out``, with the GPU architectures and -march of the
    in-place build, so that ninja reuses its objects (seconds, not minutes)."""
    import flashsemicrf

    if not (ROOT / "setup.py").is_file() or shutil.which("make") is None:
        pytest.skip("needs the source checkout and make")
    built = flashsemicrf.build_info()
    cmd = [
        "make", "wheel", f"PYTHON={sys.executable}", f"WHEEL_DIR={out}",
        f"WHEEL_ARCHS={built.get('cuda_arch_list') or '9.0'}",
        f"WHEEL_CPU_ARCH={built.get('cpu_arch') or 'native'}",
    ]
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout, proc.stderr, sep="\n")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("flashsemicrf-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]
