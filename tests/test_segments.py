"""segments_to_labels and labels_to_segments."""

from __future__ import annotations

import pytest
import torch

import flashsemicrf as F


def test_segments_to_labels_fills_and_marks_gaps():
    segs = torch.tensor([[0, 0, 2, 1], [0, 2, 1, 0], [1, 1, 3, 2]])
    labels = F.segments_to_labels(segs, 2, 5)
    assert labels.tolist() == [[1, 1, 0, -1, -1], [-1, 2, 2, 2, -1]]


def test_segments_to_labels_rejects_overlap_and_outside():
    with pytest.raises(ValueError, match="overlap"):
        F.segments_to_labels(torch.tensor([[0, 0, 2, 1], [0, 1, 2, 0]]), 1, 5)
    with pytest.raises(ValueError, match="segments row 0"):
        F.segments_to_labels(torch.tensor([[0, 4, 2, 1]]), 1, 5)
    with pytest.raises(ValueError, match="segments row 0"):
        F.segments_to_labels(torch.tensor([[1, 0, 2, 1]]), 1, 5)


def test_labels_to_segments_splits_runs_at_max_duration():
    labels = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2], [3, 3, 1, 1, 1, 1, 9, 9]])
    segs = F.labels_to_segments(labels, torch.tensor([8, 6]), 2)
    assert segs.tolist() == [
        [0, 0, 2, 0], [0, 2, 2, 0], [0, 4, 1, 0], [0, 5, 2, 1], [0, 7, 1, 2],
        [1, 0, 2, 3], [1, 2, 2, 1], [1, 4, 2, 1],
    ]


@pytest.mark.parametrize("seed", range(20))
def test_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, K, C = 3, 17, 4, 3
    labels = torch.randint(C, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    segs = F.labels_to_segments(labels, lengths, K)
    assert (segs[:, 2] <= K).all() and (segs[:, 2] >= 1).all()
    back = F.segments_to_labels(segs, B, T)
    inside = torch.arange(T)[None] < lengths[:, None]
    assert torch.equal(back[inside], labels[inside])
    assert (back[~inside] == -1).all()
    # The segments tile every sequence, so they are a valid input to score().
    scores = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    emissions = scores.gather(2, labels[..., None]).squeeze(2)
    got = F.score(segs, scores, torch.zeros(C, C, dtype=torch.float64),
                  torch.zeros(K, C, dtype=torch.float64), lengths)
    assert torch.allclose(got, (emissions * inside).sum(1))


def test_labels_to_segments_bad_input():
    with pytest.raises(TypeError, match="labels"):
        F.labels_to_segments(torch.zeros(2, 3), None, 2)
    with pytest.raises(ValueError, match="max_duration"):
        F.labels_to_segments(torch.zeros(2, 3, dtype=torch.long), None, 0)
    with pytest.raises(ValueError, match="≥ 0"):
        F.labels_to_segments(torch.full((2, 3), -1), None, 2)
    with pytest.raises(ValueError, match="lengths"):
        F.labels_to_segments(torch.zeros(2, 3, dtype=torch.long), torch.tensor([4, 1]), 2)
