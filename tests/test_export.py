"""torch.export of modules that call the C++ ops, and AOTInductor compile + reload."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import flashsemicrf as F
from conftest import assert_close
from flashsemicrf import backends

pytestmark = pytest.mark.skipif(not backends.HAS_CPU_KERNELS,
                                reason="the compiled C++ ops are not built here")


class LogPartition(torch.nn.Module):
    def __init__(self, C: int = 3, K: int = 4, duration_dependent: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shape = (K, C, C) if duration_dependent else (C, C)
        self.transition = torch.nn.Parameter(torch.randn(*shape, generator=g))
        self.duration = torch.nn.Parameter(torch.randn(K, C, generator=g))
        self.start_transition = torch.nn.Parameter(torch.randn(C, generator=g))

    def forward(self, scores, lengths):
        return F.log_partition(scores, self.transition, self.duration, lengths,
                               start_transition=self.start_transition, backend="cpu")


def dynamic_batch_and_length():
    B, T = torch.export.Dim("B", min=1, max=4096), torch.export.Dim("T", min=2, max=10**7)
    return {"scores": {0: B, 1: T}, "lengths": {0: B}}


def ops_in(ep) -> set:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("duration_dependent", [False, True])
def test_exported_log_partition_runs_the_cpp_op_on_new_shapes(duration_dependent):
    m = LogPartition(duration_dependent=duration_dependent)
    scores, lengths = torch.randn(2, 10, 3), torch.tensor([10, 7])
    ep = torch.export.export(m, (scores, lengths), dynamic_shapes=dynamic_batch_and_length())
    assert "flashsemicrf.forward.default" in ops_in(ep)
    exported = ep.module()
    for B, T in [(2, 10), (3, 57), (1, 2)]:
        x = torch.randn(B, T, 3)
        L = torch.randint(1, T + 1, (B,))
        assert_close(f"B={B} T={T}", exported(x, L), m(x, L), 1e-5)
    # The exported program keeps the op's autograd formula.
    x = torch.randn(2, 20, 3, requires_grad=True)
    L = torch.tensor([20, 9])
    g_exported, = torch.autograd.grad(exported(x, L).sum(), x)
    g_eager, = torch.autograd.grad(m(x, L).sum(), x)
    assert_close("d log Z / d scores", g_exported, g_eager, 1e-5)


class HeadLogPartition(torch.nn.Module):
    """The head's forward is its loss; log Z is a method, exported through this."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, lengths):
        return self.head.log_partition(hidden, lengths)


def test_exported_head_log_partition_runs_the_cpp_op():
    head = HeadLogPartition(F.SemiCRF(3, 4, 8, backend="cpu"))
    hidden, lengths = torch.randn(2, 12, 8), torch.tensor([12, 5])
    T = torch.export.Dim("T", min=2, max=10**6)
    ep = torch.export.export(head, (hidden, lengths), dynamic_shapes={"hidden": {1: T},
                                                                      "lengths": None})
    assert "flashsemicrf.forward.default" in ops_in(ep)
    h2 = torch.randn(2, 40, 8)
    assert_close("head log Z", ep.module()(h2, lengths), head(h2, lengths), 1e-5)


def test_exported_head_loss():
    head = F.SemiCRF(3, 4, 8, backend="cpu")

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, hidden, segments, lengths):
            return self.head.loss(hidden, segments, lengths)

    hidden, lengths = torch.randn(2, 10, 8), torch.tensor([10, 7])
    segments = F.labels_to_segments(torch.randint(0, 3, (2, 10)), lengths, 4)
    ep = torch.export.export(Loss(), (hidden, segments, lengths))
    assert_close("loss", ep.module()(hidden, segments, lengths),
                 Loss()(hidden, segments, lengths), 1e-5)


def _aoti_unavailable() -> str | None:
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        return "this torch has no torch._inductor.aoti_compile_and_package"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler for AOTInductor"
    return None


@pytest.mark.skipif(_aoti_unavailable() is not None, reason=str(_aoti_unavailable()))
def test_aoti_compile_and_reload(tmp_path):
    m = LogPartition(duration_dependent=True)
    scores, lengths = torch.randn(2, 10, 3), torch.tensor([10, 7])
    ep = torch.export.export(m, (scores, lengths), dynamic_shapes=dynamic_batch_and_length())
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "logz.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for B, T in [(2, 10), (3, 333)]:
        x = torch.randn(B, T, 3)
        L = torch.randint(1, T + 1, (B,))
        assert_close(f"AOTI B={B} T={T}", loaded(x, L), m(x, L), 1e-5)


def test_exported_nll_takes_new_gold_segmentations():
    m = LogPartition()

    class Nll(torch.nn.Module):
        def forward(self, segments, scores, lengths):
            return F.nll(segments, scores, m.transition, m.duration, lengths,
                         start_transition=m.start_transition, backend="cpu")

    def gold(B, T, lengths):
        labels = torch.randint(0, 3, (B, T))
        return F.labels_to_segments(labels, lengths, 4)

    lengths = torch.tensor([10, 7])
    # N - 1 appears as a size inside, and export specialises sizes 0 and 1.
    N, T = torch.export.Dim("N", min=3, max=10**7), torch.export.Dim("T", min=2, max=10**6)
    ep = torch.export.export(Nll(), (gold(2, 10, lengths), torch.randn(2, 10, 3), lengths),
                             dynamic_shapes={"segments": {0: N}, "scores": {1: T},
                                             "lengths": None})
    assert "flashsemicrf.forward.default" in ops_in(ep)
    for T_new, L in [(10, torch.tensor([10, 7])), (31, torch.tensor([31, 4]))]:
        segments, scores = gold(2, T_new, L), torch.randn(2, T_new, 3)
        assert_close(f"nll T={T_new}", ep.module()(segments, scores, L),
                     Nll()(segments, scores, L), 1e-5)
