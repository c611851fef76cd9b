"""The "cpu" and "cuda" backends: the C++ and CUDA kernels of ``flashsemicrf._C``.

Loading the extension defines the ops ``flashsemicrf::{forward, backward,
viterbi, filter}`` (csrc/semicrf.cpp) with their CPU and CUDA kernels; this
module gives them the contract's fakes and autograd formula, so that
``torch.compile(fullgraph=True)`` traces the public functions through them.
"""

from __future__ import annotations

from .. import _contract, _extension

NAMESPACE = "flashsemicrf"

LOADED = _extension.load() is not None
if LOADED:
    _contract.register(NAMESPACE)
