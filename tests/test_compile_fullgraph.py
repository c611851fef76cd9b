"""The training loss and decoding under torch.compile(fullgraph=True, dynamic=True).

Value checks that read tensor data (segments tiling, lengths in range, +inf
scores, an infeasible gold) run eagerly and are skipped while tracing; the
conversions between segments and label maps have no data-dependent Python
branches. Each test compiles for three lengths, checks that one graph serves
them all, and compares with eager mode. On the CPU: the C++ kernel ("cpu",
when built) and the reference ("torch").
"""

from __future__ import annotations

import pytest
import torch

import flashsemicrf as fsc
from flashsemicrf import backends

BACKENDS = [b for b in ("cpu", "torch") if b in backends.available("cpu")]
LENGTHS = (13, 18, 25)


def _counting(inner):
    """A torch.compile backend that records every graph it is given."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    return backend, graphs


def _batch(T, B=3, C=4, K=5, H=6, seed=0):
    g = torch.Generator().manual_seed(seed + T)
    x = torch.randn(B, T, H, generator=g)
    lengths = torch.tensor([T, T - 4, T - 9])
    labels = torch.randint(0, C, (B, T), generator=g)
    return x, labels, lengths


class Tagger(torch.nn.Module):
    """An encoder and the head, as a user would compile them."""

    def __init__(self, backend, C=4, K=5, H=6):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(H, H)
        self.head = fsc.SemiCRF(C, K, hidden_dim=H, boundary_projections=True, backend=backend)
        with torch.no_grad():
            self.head.transition.normal_()
            self.head.duration.normal_()

    def forward(self, x, segments, lengths):
        return self.head(self.encoder(x), segments, lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_loss_backward_and_decode_compile_fullgraph(backend):
    torch._dynamo.reset()
    model, eager = Tagger(backend), Tagger(backend)
    loss_backend, loss_graphs = _counting("inductor")
    step = torch.compile(model, fullgraph=True, dynamic=True, backend=loss_backend)
    decode_backend, decode_graphs = _counting("aot_eager")
    decode = torch.compile(lambda x, lengths: model.head.decode(model.encoder(x), lengths),
                           fullgraph=True, dynamic=True, backend=decode_backend)
    for T in LENGTHS:
        x, labels, lengths = _batch(T)
        segments = fsc.labels_to_segments(labels, lengths, 5)
        model.zero_grad()
        eager.zero_grad()
        loss = step(x, segments, lengths)
        want = eager(x, segments, lengths)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        loss.backward()
        want.backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            got = decode(x, lengths)
            assert torch.equal(got, eager.head.decode(eager.encoder(x), lengths))
    assert len(loss_graphs) == 1, f"the loss recompiled for a new length: {len(loss_graphs)}"
    assert len(decode_graphs) == 1, f"decode recompiled for a new length: {len(decode_graphs)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_nll_and_viterbi_compile_fullgraph(backend):
    torch._dynamo.reset()
    C, K = 4, 5

    def nll(scores, transition, duration, lengths, segments):
        return fsc.nll(segments, scores, transition, duration, lengths, backend=backend)

    def partition_minus_score(scores, transition, duration, lengths, segments):
        kw = dict(lengths=lengths, backend=backend)
        return (fsc.log_partition(scores, transition, duration, **kw)
                - fsc.score(segments, scores, transition, duration, **kw))

    def viterbi(scores, transition, duration, lengths):
        return fsc.viterbi(scores, transition, duration, lengths, backend=backend)

    compiled = {}
    for name, fn in (("nll", nll), ("diff", partition_minus_score), ("viterbi", viterbi)):
        be, graphs = _counting("aot_eager")
        compiled[name] = (fn, torch.compile(fn, fullgraph=True, dynamic=True, backend=be), graphs)
    for T in LENGTHS:
        g = torch.Generator().manual_seed(T)
        scores = torch.randn(3, T, C, generator=g, requires_grad=True)
        transition = torch.randn(C, C, generator=g)
        duration = torch.randn(K, C, generator=g)
        lengths = torch.tensor([T, T - 4, T - 9])
        _, segments = fsc.viterbi(scores, transition, duration, lengths, backend=backend)
        args = (scores, transition, duration, lengths)
        for name in ("nll", "diff"):
            eager_fn, fn, _ = compiled[name]
            got, want = fn(*args, segments), eager_fn(*args, segments)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            (g_got,) = torch.autograd.grad(got.sum(), scores)
            (g_want,) = torch.autograd.grad(want.sum(), scores)
            torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
        eager_fn, fn, _ = compiled["viterbi"]
        best, segs = fn(*(a.detach() for a in args))
        want_best, want_segs = eager_fn(*(a.detach() for a in args))
        torch.testing.assert_close(best, want_best)
        assert torch.equal(segs, want_segs)
    for name, (_, _, graphs) in compiled.items():
        assert len(graphs) == 1, f"{name} recompiled for a new length: {len(graphs)} graphs"


def test_label_map_conversions_compile_fullgraph():
    """labels_to_segments inside a compiled training step (no graph break)."""
    torch._dynamo.reset()
    be, graphs = _counting("aot_eager")

    def convert(labels, lengths):
        return fsc.labels_to_segments(labels, lengths, 3)

    fn = torch.compile(convert, fullgraph=True, dynamic=True, backend=be)
    for T in LENGTHS:
        _, labels, lengths = _batch(T)
        assert torch.equal(fn(labels, lengths), convert(labels, lengths))
    assert len(graphs) == 1
