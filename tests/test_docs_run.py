"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs on its own (a fresh namespace, the repository root as the
working directory), so every block must be self-contained. A block whose
first lines say ``# requires: package`` is skipped, with that reason, when the
package cannot be imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
REQUIRES = re.compile(r"^# requires: ([\w., -]+)$", re.M)


def _blocks():
    for path in DOCS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(path, line, match.group(1),
                               id=f"{path.relative_to(ROOT)}:{line}")


def test_the_docs_have_python_blocks():
    found = {Path(p.values[0]).name for p in _blocks()}
    assert {"README.md", "guide.md"} <= found, found


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def test_a_block_that_requires_a_missing_package_is_skipped_with_the_reason():
    code = "# requires: no_such_package_here\nraise AssertionError('ran')\n"
    with pytest.raises(pytest.skip.Exception, match="needs no_such_package_here"):
        test_python_block_runs(ROOT / "README.md", 1, code, None)  # skips before using monkeypatch


@pytest.mark.parametrize("path,line,code", list(_blocks()))
def test_python_block_runs(path, line, code, monkeypatch):
    for wanted in REQUIRES.findall(code):
        for name in (n.strip() for n in wanted.split(",")):
            if not _installed(name):
                pytest.skip(f"{path.name}:{line} needs {name}, which is not installed")
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("FLASHSEMICRF_BACKEND", raising=False)
    torch.manual_seed(0)
    # Line numbers in tracebacks point into the Markdown file.
    compiled = compile("\n" * line + code, f"{os.fspath(path)}", "exec")
    exec(compiled, {"__name__": "__doc_block__"})


BLOCKER = """
import sys, runpy
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tqdm", "matplotlib"):
            raise ImportError(f"{name} is blocked by the test")
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("example", ["gene_structure.py", "speaker_turns.py"])
def test_examples_answer_help_without_the_optional_packages(example):
    """tqdm and matplotlib (the bench extra) are imported only where they are used."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT)}
    out = subprocess.run([sys.executable, "-c", BLOCKER, os.fspath(ROOT / "examples" / example)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
