"""Finding the CUDA binary tools the tests read compiled code with."""

from __future__ import annotations

import importlib.util
import os
import shutil


def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, or the copy Triton ships; None without either."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        roots.append(os.path.join(spec.submodule_search_locations[0], "backends", "nvidia"))
    for root in filter(None, roots):
        path = os.path.join(root, "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return None
