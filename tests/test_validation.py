"""Bad input (docs/design.md, "Bad input"): a clear ValueError/TypeError naming the argument, on every function."""

from __future__ import annotations

import pytest
import torch

import flashsemicrf as F
from conftest import make_case

CASE = make_case(0, 2, 6, 3, 4, ragged=False)
GOOD_SEGMENTS = torch.tensor([[0, 0, 3, 1], [0, 3, 3, 2], [1, 0, 2, 0], [1, 2, 3, 3], [1, 5, 1, 0]])


def _kw(**changes):
    kw = dict(CASE.kwargs)
    kw.update(changes)
    return {k: v for k, v in kw.items() if v is not None or k in changes}


def _call(fn_name, kw):
    fn = getattr(F, fn_name)
    if fn_name in ("score", "nll"):
        return fn(GOOD_SEGMENTS, **kw)
    return fn(**kw)


FUNCTIONS = ["log_partition", "viterbi", "marginals", "entropy", "sample", "score", "nll"]
B, T, C, K = 2, 6, 4, 3
f64 = torch.float64

BAD = [
    # (id, changes, exception, words that must appear in the message)
    ("scores-2d", dict(scores=torch.zeros(T, C, dtype=f64)), ValueError, ["scores", "(B, T, C)"]),
    ("scores-int", dict(scores=torch.zeros(B, T, C, dtype=torch.long)), TypeError, ["scores", "dtype"]),
    ("scores-list", dict(scores=[[0.0]]), TypeError, ["scores"]),
    ("transition-rank", dict(transition=torch.zeros(C, dtype=f64)), ValueError, ["transition"]),
    ("transition-C", dict(transition=torch.zeros(C + 1, C + 1, dtype=f64)), ValueError, ["transition", "(C, C)"]),
    ("transition-K", dict(transition=torch.zeros(K + 1, C, C, dtype=f64)), ValueError, ["transition", "(K, C, C)"]),
    ("transition-int", dict(transition=torch.zeros(C, C, dtype=torch.int32)), TypeError, ["transition"]),
    ("duration-C", dict(duration=torch.zeros(K, C + 1, dtype=f64)), ValueError, ["duration", "(K, C)"]),
    ("duration-rank", dict(duration=torch.zeros(K, dtype=f64)), ValueError, ["duration"]),
    ("duration-K0", dict(duration=torch.zeros(0, C, dtype=f64)), ValueError, ["duration", "K"]),
    ("lengths-zero", dict(lengths=torch.tensor([0, 3])), ValueError, ["lengths", "[1, 6]"]),
    ("lengths-long", dict(lengths=torch.tensor([7, 3])), ValueError, ["lengths", "[1, 6]"]),
    ("lengths-float", dict(lengths=torch.tensor([3.0, 3.0])), TypeError, ["lengths", "integer"]),
    ("lengths-shape", dict(lengths=torch.tensor([3, 3, 3])), ValueError, ["lengths", "(B,)"]),
    ("lengths-bool", dict(lengths=torch.tensor([True, True])), TypeError, ["lengths"]),
    ("start_transition", dict(start_transition=torch.zeros(C + 1, dtype=f64)), ValueError, ["start_transition", "(C,)"]),
    ("end_transition", dict(end_transition=torch.zeros(1, C, dtype=f64)), ValueError, ["end_transition"]),
    ("start_scores", dict(start_scores=torch.zeros(B, T + 1, C, dtype=f64)), ValueError, ["start_scores", "(B, T, C)"]),
    ("end_scores", dict(end_scores=torch.zeros(B, T, C, dtype=torch.int64)), TypeError, ["end_scores"]),
    ("device", dict(transition=torch.zeros(C, C, dtype=f64, device="meta")), ValueError, ["transition", "device"]),
    ("backend", dict(backend="gpu"), ValueError, ["backend", "'gpu'"]),
]


@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("bad_id,changes,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(fn_name, bad_id, changes, exc, words):
    with pytest.raises(exc) as info:
        _call(fn_name, _kw(**changes))
    message = str(info.value)
    assert fn_name in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


SEGMENT_BAD = [
    ("overlap", [[0, 0, 3, 1], [0, 2, 3, 2], [1, 0, 3, 0], [1, 3, 3, 0]], "overlaps"),
    ("gap", [[0, 0, 2, 1], [0, 3, 3, 2], [1, 0, 3, 0], [1, 3, 3, 0]], "gap"),
    ("start-not-0", [[0, 1, 3, 1], [0, 4, 2, 2], [1, 0, 3, 0], [1, 3, 3, 0]], "position other than 0"),
    ("too-long", [[0, 0, 4, 1], [0, 4, 2, 2], [1, 0, 3, 0], [1, 3, 3, 0]], "duration outside"),
    ("short", [[0, 0, 3, 1], [0, 3, 2, 2], [1, 0, 3, 0], [1, 3, 3, 0]], "ends its sequence"),
    ("label", [[0, 0, 3, 4], [0, 3, 3, 2], [1, 0, 3, 0], [1, 3, 3, 0]], "label outside"),
    ("batch", [[0, 0, 3, 1], [0, 3, 3, 2], [1, 0, 3, 0], [2, 0, 3, 0]], "batch index"),
    ("order", [[0, 3, 3, 2], [0, 0, 3, 1], [1, 0, 3, 0], [1, 3, 3, 0]], "out of order"),
    ("missing-seq", [[0, 0, 3, 1], [0, 3, 3, 2]], "no segment for sequence 1"),
    ("past-length", [[0, 0, 3, 1], [0, 3, 3, 2], [1, 0, 3, 0], [1, 3, 3, 0], [1, 6, 1, 0]], "past the end"),
]


@pytest.mark.parametrize("fn_name", ["score", "nll"])
@pytest.mark.parametrize("bad_id,rows,words", SEGMENT_BAD, ids=[b[0] for b in SEGMENT_BAD])
def test_bad_segments(fn_name, bad_id, rows, words):
    with pytest.raises(ValueError) as info:
        getattr(F, fn_name)(torch.tensor(rows), **CASE.kwargs)
    assert "segments" in str(info.value) and words in str(info.value), str(info.value)


def test_segments_type_and_shape():
    with pytest.raises(TypeError, match="segments"):
        F.score(GOOD_SEGMENTS.double(), **CASE.kwargs)
    with pytest.raises(ValueError, match=r"segments.*\(N, 4\)"):
        F.score(GOOD_SEGMENTS[:, :3], **CASE.kwargs)


def test_sample_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        F.sample(**CASE.kwargs, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        F.sample(**CASE.kwargs, num_samples=2.0)
    with pytest.raises(TypeError, match="generator"):
        F.sample(**CASE.kwargs, generator=3)


def test_backend_for_the_wrong_device_is_an_error():
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        F.log_partition(**CASE.kwargs, backend="cuda")


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("FLASHSEMICRF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FLASHSEMICRF_BACKEND"):
        F.log_partition(**CASE.kwargs)
    monkeypatch.setenv("FLASHSEMICRF_BACKEND", "torch")
    assert torch.isfinite(F.log_partition(**CASE.kwargs)).all()


def test_lengths_as_list_and_on_cpu_are_accepted():
    a = F.log_partition(**_kw(lengths=[6, 4]))
    b = F.log_partition(**_kw(lengths=torch.tensor([6, 4], dtype=torch.int32)))
    assert torch.equal(a, b)
