"""The binary wheel (`make wheel`) as a user gets it.

The wheel is built once per run, with the GPU architectures and -march of
the in-place build the other tests use, so that ninja reuses its objects
(seconds; a release build with every architecture takes minutes and is run
by hand: README, "Wheels"). It is installed with `pip install --no-deps
--target` into a fresh folder outside the checkout and imported by a Python
that has no compiler on its PATH and no CUDA_HOME.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import flashsemicrf
from flashsemicrf import _extension
from toolchain import build_wheel, cuobjdump

COMPILERS = ("gcc", "g++", "cc", "c++", "clang", "nvcc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-compile", "--target", str(target), str(wheel)],
        check=True,
    )
    return target


def run_python(code: str, site: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    """``python -c code`` with only ``site`` added to the path, from ``cwd``,
    with an empty PATH (no compiler) and no CUDA_HOME."""
    bare = cwd / "empty-bin"
    bare.mkdir(exist_ok=True)
    base = {"PATH": str(bare), "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1",
            "HOME": os.environ.get("HOME", str(cwd))}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=300)


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def test_wheel_version_names_its_torch_and_cuda(wheel):
    built = flashsemicrf.build_info()
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    cuda = torch.version.cuda if built.get("cuda_kernels") else None
    tag = f"+torch{major}.{minor}" + (f"cu{cuda.replace('.', '')}" if cuda else "cpu")
    assert wheel_version(wheel).endswith(tag), (wheel.name, tag)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = z.read("flashsemicrf/_build_info.py").decode()
    assert any(re.fullmatch(r"flashsemicrf/_C\..*\.so", n) for n in names), names
    assert f"'version': '{wheel_version(wheel)}'" in info, info


CHECK_CPU_KERNEL = """
import json, shutil, torch
import flashsemicrf as fsc

compilers = [c for c in {compilers!r} if shutil.which(c)]
g = torch.Generator().manual_seed(0)
B, T, K, C = 3, 40, 6, 4
def r(*s):
    return torch.randn(*s, generator=g, dtype=torch.float64)
kw = dict(scores=r(B, T, C), transition=r(C, C), duration=r(K, C),
          lengths=torch.tensor([40, 17, 1]), start_transition=r(C), end_scores=r(B, T, C))
results = {{}}
for backend in ("cpu", "torch"):
    leaves = {{k: v.clone().requires_grad_() if v.is_floating_point() else v
              for k, v in kw.items()}}
    z = fsc.log_partition(**leaves, backend=backend)
    z.sum().backward()
    results[backend] = [z.detach()] + [v.grad for v in leaves.values() if v.is_floating_point()]
err = max(float((a - b).abs().max()) for a, b in zip(results["cpu"], results["torch"]))
print(json.dumps({{"file": fsc.__file__, "info": fsc.build_info(), "err": err,
                  "compilers": compilers}}))
"""


def test_installed_wheel_runs_without_a_compiler(wheel, site, tmp_path):
    proc = run_python(CHECK_CPU_KERNEL.format(compilers=COMPILERS), site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compilers"] == [], out["compilers"]
    assert Path(out["file"]).is_relative_to(site), out["file"]
    info = out["info"]
    assert info["version"] == wheel_version(wheel)
    assert info["torch"] == torch.__version__ and info["cpu_kernels"]
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and all(re.fullmatch(r"sm_\d+a?", a) for a in info["cuda_archs"])
    print(f"CPU kernel vs reference, float64: max |diff| = {out['err']:.3e}")
    assert out["err"] <= 1e-9


def test_mismatched_torch_is_a_clear_import_error(site, tmp_path):
    copy = tmp_path / "site"
    # No bytecode: an edit of the same size within the same second would not
    # invalidate a cached .pyc.
    shutil.copytree(site, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / "flashsemicrf" / "_build_info.py"
    text = path.read_text()
    path.write_text(re.sub(r"'torch': '[^']*'", "'torch': '1.13.1+cu117'", text))

    proc = run_python("import flashsemicrf", copy, tmp_path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # an exception, not a crash
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:"), proc.stderr
    assert "torch 1.13.1+cu117" in last and f"torch {torch.__version__}" in last, last
    assert "FLASHSEMICRF_DISABLE_EXTENSION=1" in last, last

    code = ("import torch, flashsemicrf as fsc; "
            "print(float(fsc.log_partition(torch.zeros(1, 3, 2), torch.zeros(2, 2), "
            "torch.zeros(2, 2))[0]))")
    proc = run_python(code, copy, tmp_path, FLASHSEMICRF_DISABLE_EXTENSION="1")
    assert proc.returncode == 0, proc.stderr
    # Every score 0: log Z counts the labelled segmentations of 3 positions into
    # segments of length 1 or 2 with 2 labels, N(t) = 2 N(t-1) + 2 N(t-2) = 16.
    assert abs(float(proc.stdout) - math.log(16)) < 1e-6


def test_library_holds_the_requested_sass(site):
    info = json.loads(run_python("import json, flashsemicrf; print(json.dumps("
                                 "flashsemicrf.build_info()))", site, site.parent).stdout)
    if not info["cuda_kernels"]:
        pytest.skip("the wheel was built without CUDA kernels (no nvcc)")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's copy)")
    (lib,) = (site / "flashsemicrf").glob("_C.*.so")
    elf = subprocess.run([tool, "--list-elf", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    print(elf)
    assert sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", elf))) == sorted(info["cuda_archs"])
    if info["cuda_ptx"]:
        ptx = subprocess.run([tool, "--list-ptx", str(lib)], capture_output=True, text=True,
                             check=True).stdout
        print(ptx)
        found = {f"compute_{m}" for m in re.findall(r"\.sm_(\d+a?)\.ptx", ptx)}
        assert found == set(info["cuda_ptx"]), (found, info["cuda_ptx"])


def test_incompatibility_names_both_sides(monkeypatch):
    here = {"version": "0.1.0+x", "torch": torch.__version__, "torch_cuda": "13.0",
            "cuda_kernels": False, "cpu_arch": "none"}
    assert _extension.incompatibility(here) == ""
    assert _extension.incompatibility({}) == ""

    msg = _extension.incompatibility({**here, "torch": "2.3.1+cu121"})
    assert "torch 2.3.1+cu121" in msg and f"torch {torch.__version__}" in msg

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    msg = _extension.incompatibility({**here, "cuda_kernels": True})
    assert "CUDA 13.0" in msg and "CUDA 12.8" in msg
    monkeypatch.setattr(torch.version, "cuda", "13.2")  # same major: runs
    assert _extension.incompatibility({**here, "cuda_kernels": True}) == ""
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA" in _extension.incompatibility({**here, "cuda_kernels": True})

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    msg = _extension.incompatibility({**here, "cpu_arch": "x86-64-v3"})
    assert "x86-64-v3" in msg and "DEFAULT" in msg
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert _extension.incompatibility({**here, "cpu_arch": "x86-64-v3"}) == ""
    assert "AVX512" in _extension.incompatibility({**here, "cpu_arch": "x86-64-v4"})
