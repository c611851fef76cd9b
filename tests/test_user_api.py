"""What a new user brings: segments in one place, labels and masks, reductions,
decoding to label lists, pytorch-crf habits, and errors that say what to do.

Also the head's ``constraints=``, ``SemiCRFDistribution.sample((S,))``, and
the Args/Returns/Raises of every public function and method.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import flashsemicrf as fsc
from flashsemicrf import nn as fsc_nn

B, T, C, K, H = 3, 12, 3, 4, 5


def make_head(seed=0, **kw):
    torch.manual_seed(seed)
    head = fsc.SemiCRF(C, K, **{"hidden_dim": H, **kw}).double()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name in ("transition", "duration", "start_transition", "end_transition"):
                p.normal_()
    return head


def batch(seed=1, width=H):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, width, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 7, 3])
    labels = torch.randint(0, C, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return hidden, lengths, labels, mask


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------ one API shape


def test_segments_come_before_lengths_in_every_function_and_method():
    callables = [fsc.score, fsc.nll, fsc.SemiCRF.forward, fsc.SemiCRF.loss, fsc.SemiCRF.score]
    for fn in callables:
        names = list(inspect.signature(fn).parameters)
        assert names.index("segments") < names.index("lengths"), fn.__qualname__
    for fn in (fsc.SemiCRF.forward, fsc.SemiCRF.loss, fsc.SemiCRF.score):
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["self", "hidden", "segments", "lengths"], fn.__qualname__
        assert params["labels"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["mask"].kind is inspect.Parameter.KEYWORD_ONLY


def test_head_forward_loss_and_functional_nll_agree():
    head = make_head()
    hidden, lengths, labels, _ = batch()
    seg = fsc.labels_to_segments(labels, lengths, K)
    pot = head.potentials(hidden, lengths)
    per_seq = fsc.nll(seg, **pot)
    close(head(hidden, seg, lengths), per_seq.mean())
    close(head.loss(hidden, seg, lengths), per_seq.mean())
    close(head.loss(hidden, segments=seg, lengths=lengths, reduction="none"), per_seq)
    close(head.score(hidden, seg, lengths), fsc.score(seg, **pot))
    close(head.log_partition(hidden, lengths), fsc.log_partition(**pot))


def test_labels_and_mask_keywords_equal_segments_and_lengths():
    head = make_head()
    hidden, lengths, labels, mask = batch()
    seg = fsc.labels_to_segments(labels, lengths, K)
    want = head.loss(hidden, seg, lengths, reduction="none")
    close(head.loss(hidden, labels=labels, mask=mask, reduction="none"), want)
    close(head(hidden, labels=labels, lengths=lengths, reduction="none"), want)
    close(head(hidden, seg, mask=mask, reduction="none"), want)
    close(head(hidden, seg, mask=mask.to(torch.uint8), reduction="none"), want)  # older masks
    close(head(hidden, seg, mask, reduction="none"), want)  # a mask in lengths' place
    close(head.score(hidden, labels=labels, mask=mask), head.score(hidden, seg, lengths))
    with pytest.raises(ValueError, match="not both"):
        head.loss(hidden, seg, labels=labels, lengths=lengths)
    with pytest.raises(ValueError, match="not both"):
        head.loss(hidden, seg, lengths, mask=mask)


def test_a_bool_prefix_mask_is_accepted_wherever_lengths_are():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    transition = torch.randn(C, C, generator=g, dtype=torch.float64)
    duration = torch.randn(K, C, generator=g, dtype=torch.float64)
    _, lengths, labels, mask = batch()
    args = (scores, transition, duration)
    close(fsc.log_partition(*args, mask), fsc.log_partition(*args, lengths))
    close(fsc.entropy(*args, mask), fsc.entropy(*args, lengths))
    close(fsc.marginals(*args, mask).labels, fsc.marginals(*args, lengths).labels)
    assert torch.equal(fsc.viterbi(*args, mask)[1], fsc.viterbi(*args, lengths)[1])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(fsc.sample(*args, mask, generator=gen()),
                       fsc.sample(*args, lengths, generator=gen()))
    seg = fsc.labels_to_segments(labels, mask, K)
    assert torch.equal(seg, fsc.labels_to_segments(labels, lengths, K))
    close(fsc.nll(seg, *args, mask), fsc.nll(seg, *args, lengths))
    close(fsc.score(seg, *args, mask), fsc.score(seg, *args, lengths))
    dist = fsc.SemiCRFDistribution(*args, mask)
    close(dist.log_partition, fsc.log_partition(*args, lengths))
    head = make_head(hidden_dim=None)
    for method in ("log_partition", "entropy", "decode"):
        a = getattr(head, method)(scores, mask)
        b = getattr(head, method)(scores, lengths=lengths)
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b)


def test_a_mask_that_is_not_a_prefix_is_a_clear_error():
    head = make_head()
    hidden, lengths, labels, mask = batch()
    holey = mask.clone()
    holey[0, 4] = False
    with pytest.raises(ValueError, match=r"mask .*row 0 is not a prefix.*position 4"):
        head.log_partition(hidden, mask=holey)
    with pytest.raises(ValueError, match="lengths is a bool mask .*not a prefix"):
        fsc.log_partition(torch.zeros(B, T, C), torch.zeros(C, C), torch.zeros(K, C), holey)
    with pytest.raises(ValueError, match="all False in row 1"):
        head.log_partition(hidden, mask=mask & (torch.arange(B)[:, None] != 1))


def test_reductions_mean_sum_none_token_mean():
    head = make_head()
    hidden, lengths, labels, _ = batch()
    per_seq = head.loss(hidden, labels=labels, lengths=lengths, reduction="none")
    assert per_seq.shape == (B,)
    close(head.loss(hidden, labels=labels, lengths=lengths), per_seq.sum() / B)
    close(head.loss(hidden, labels=labels, lengths=lengths, reduction="sum"), per_seq.sum())
    close(head.loss(hidden, labels=labels, lengths=lengths, reduction="token_mean"),
          per_seq.sum() / lengths.sum())
    with pytest.raises(ValueError, match="token_mean"):
        head.loss(hidden, labels=labels, reduction="batchmean")


def test_decode_returns_segments_label_maps_or_per_sequence_lists():
    head = make_head()
    hidden, lengths, _, _ = batch()
    seg = head.decode(hidden, lengths)
    label_map = head.decode(hidden, lengths, output="labels")
    assert torch.equal(label_map, fsc.segments_to_labels(seg, B, T))
    lists = head.decode(hidden, mask=torch.arange(T)[None, :] < lengths[:, None], output="lists")
    assert [len(x) for x in lists] == lengths.tolist()
    assert lists == [label_map[b, :n].tolist() for b, n in enumerate(lengths.tolist())]
    best, lists2 = head.decode(hidden, lengths, output="lists", return_scores=True)
    assert lists2 == lists and best.shape == (B,)
    with pytest.raises(ValueError, match="output must be one of"):
        head.decode(hidden, lengths, output="tags")


# --------------------------------------------------------- pytorch-crf habits


def test_pytorch_crf_habits_get_errors_with_the_fix():
    head = make_head(hidden_dim=None)
    scores, lengths, tags, mask = batch(width=C)
    # crf(emissions, tags, mask=mask): tags where segments go.
    with pytest.raises(ValueError) as err:
        head(scores, tags, mask=mask)
    assert "labels=" in str(err.value) and "labels_to_segments" in str(err.value)
    # crf(emissions, mask): a bool mask where segments go.
    with pytest.raises(TypeError) as err:
        head(scores, mask)
    assert "mask=" in str(err.value) and "mask.sum(1)" in str(err.value)
    # lengths and segments swapped.
    seg = fsc.labels_to_segments(tags, lengths, K)
    with pytest.raises(ValueError, match="segments always come before lengths"):
        head.loss(scores, lengths, seg)
    with pytest.raises(ValueError, match="looks like lengths"):
        head.loss(scores, lengths)
    with pytest.raises(ValueError, match="segments always come before lengths"):
        fsc.nll(seg, scores, head.transition, head.duration, seg)
    # Forgetting the gold is an error, not log Z.
    with pytest.raises(TypeError, match=r"gold segmentation is missing.*head.log_partition"):
        head(scores)
    with pytest.raises(TypeError, match=r"gold segmentation is missing"):
        head(scores, lengths=lengths)


# ------------------------------------------------------- messages that help


def test_transposed_scores_are_named():
    scores = torch.zeros(B, C, T)
    with pytest.raises(ValueError, match=r"looks like \(B, C, T\): transpose"):
        fsc.log_partition(scores, torch.zeros(C, C), torch.zeros(K, C))
    head = make_head(hidden_dim=None)
    with pytest.raises(ValueError, match=r"looks like \(B, 3, T\): transpose"):
        head.log_partition(scores.double())


def test_padded_gold_without_lengths_says_lengths_defaulted_to_T():
    head = make_head()
    hidden, lengths, labels, _ = batch()
    seg = fsc.labels_to_segments(labels, lengths, K)
    with pytest.raises(ValueError, match=f"lengths defaulted to T = {T}"):
        head.loss(hidden, seg)
    with pytest.raises(ValueError, match=f"defaulted to T = {T}"):
        fsc.nll(seg, **{**head.potentials(hidden), "lengths": None})
    longer = lengths.clone()
    longer[1] += 1
    with pytest.raises(ValueError, match="ends its sequence before lengths") as err:
        head.loss(hidden, seg, longer)  # lengths given: nothing defaulted
    assert "defaulted" not in str(err.value)


def test_an_infeasible_gold_raises_naming_the_row_and_the_term():
    allowed = torch.ones(C, C, dtype=torch.bool)
    allowed[0, 1] = False
    head = make_head(allowed_transitions=allowed)
    hidden = torch.randn(1, 6, H, dtype=torch.float64)
    gold = torch.tensor([[0, 0, 2, 2], [0, 2, 2, 0], [0, 4, 2, 1]])  # 2 → 0 → 1: 0 → 1 forbidden
    with pytest.raises(ValueError) as err:
        head.loss(hidden, gold)
    msg = str(err.value)
    assert "row 2 (batch 0, start 4, duration 2, label 1)" in msg, msg
    assert "transition" in msg and "+inf" in msg and "allowed_transitions" in msg, msg
    pot = head.potentials(hidden)
    with pytest.raises(ValueError, match="row 2 .*transition"):
        fsc.nll(gold, **pot)
    # The score itself stays −inf: it is the truth, and Constraints.feasible relies on it.
    assert fsc.score(gold, **pot).item() == -math.inf


def test_loss_on_an_empty_batch_is_zero_not_nan():
    head = make_head()
    hidden = torch.randn(0, T, H, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(0, 4, dtype=torch.long)
    for reduction in ("mean", "sum", "token_mean"):
        loss = head.loss(hidden, empty, reduction=reduction)
        assert loss.item() == 0.0, reduction
    head.loss(hidden, empty).backward()
    assert head.loss(hidden, empty, reduction="none").shape == (0,)


def test_backend_from_the_environment_is_named_in_the_error(monkeypatch):
    monkeypatch.setenv("FLASHSEMICRF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="environment variable FLASHSEMICRF_BACKEND=cuda"):
        fsc.log_partition(torch.zeros(1, 4, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    # An explicit backend= is not blamed on the environment.
    with pytest.raises(ValueError) as err:
        fsc.log_partition(torch.zeros(1, 4, 2), torch.zeros(2, 2), torch.zeros(2, 2),
                          backend="cuda")
    assert "FLASHSEMICRF_BACKEND" not in str(err.value)


def test_plus_inf_scores_are_rejected_clearly():
    scores = torch.zeros(1, 4, 2)
    scores[0, 2, 1] = math.inf
    with pytest.raises(ValueError, match=r"scores contains \+inf .*\(0, 2, 1\)"):
        fsc.log_partition(scores, torch.zeros(2, 2), torch.zeros(2, 2))
    transition = torch.zeros(2, 2)
    transition[1, 0] = math.inf
    with pytest.raises(ValueError, match=r"transition contains \+inf"):
        fsc.viterbi(torch.zeros(1, 4, 2), transition, torch.zeros(2, 2))


def test_distribution_sample_takes_a_sample_shape_like_torch_distributions():
    g = torch.Generator().manual_seed(0)
    dist = fsc.SemiCRFDistribution(torch.randn(2, 6, 3, generator=g), torch.randn(3, 3, generator=g),
                                   torch.randn(2, 3, generator=g))
    a = dist.sample((2,), generator=torch.Generator().manual_seed(5))
    b = dist.sample(2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and set(a[:, 0].tolist()) == {0, 1}
    assert torch.equal(dist.sample(torch.Size([2]), generator=torch.Generator().manual_seed(5)), b)
    one = dist.sample((), generator=torch.Generator().manual_seed(5))
    assert set(one[:, 0].tolist()) == {0}
    with pytest.raises(ValueError, match=r"flatten it to \(S,\)"):
        dist.sample((2, 3))


# ------------------------------------------------------------ constraints


def test_head_constraints_apply_in_training_and_decoding():
    rules = (fsc.Constraints.allow_all(["O", "A", "B"], max_duration=K)
             .forbid_transitions([("A", "B")]).with_start(["O"]).with_end(["O", "B"])
             .with_durations(minimum={"A": 2}))
    head = make_head(constraints=rules)
    plain = make_head()
    hidden, lengths, _, _ = batch()
    want = rules.apply(plain.potentials(hidden, lengths))
    got = head.potentials(hidden, lengths)
    for key in ("transition", "duration", "start_transition", "end_transition"):
        assert torch.equal(got[key], want[key]), key
    close(head.log_partition(hidden, lengths), fsc.log_partition(**want))
    pred = head.decode(hidden, lengths)
    rules.check(pred)
    assert rules.feasible(pred, B).all()
    # Training: the gold must be feasible, and gradients stay off forbidden entries.
    loss = head.loss(hidden, pred, lengths)
    loss.backward()
    assert torch.isfinite(loss)
    assert head.transition.grad[1, 2] == 0 and head.duration.grad[0, 1] == 0
    bad = torch.tensor([[0, 0, 1, 1], [0, 1, 4, 0], [0, 5, 4, 0], [0, 9, 3, 0]])  # a 1-long "A"
    with pytest.raises(ValueError, match="head.constraints.check"):
        head.loss(hidden[:1], bad)
    with pytest.raises(ValueError, match="max_duration"):
        fsc.SemiCRF(C, K + 1, constraints=rules)
    with pytest.raises(ValueError, match="labels"):
        fsc.SemiCRF(C + 1, K, constraints=rules)


def test_head_constraints_follow_the_head_and_compile():
    rules = fsc.Constraints.allow_all(C).forbid_repeats([0]).with_end([1, 2])
    head = make_head(constraints=rules, start_end_transitions=False)
    assert "constraint_transitions" in dict(head.named_buffers())
    hidden, lengths, labels, _ = batch()
    pot = head.potentials(hidden, lengths)
    assert pot["end_transition"][0] == -math.inf and pot["start_transition"] is None
    torch._dynamo.reset()
    fn = torch.compile(lambda h, n: head.log_partition(h, n), fullgraph=True, backend="eager")
    close(fn(hidden, lengths), head.log_partition(hidden, lengths))


# ------------------------------------------------------------- docstrings


def _public_callables():
    for name in ("log_partition", "marginals", "entropy", "viterbi", "sample", "score", "nll",
                 "labels_to_segments", "segments_to_labels"):
        yield name, getattr(fsc, name)
    for name, member in inspect.getmembers(fsc.SemiCRF, inspect.isfunction):
        if (not name.startswith("_") and member.__module__ == fsc_nn.__name__
                and name != "extra_repr"):  # nn.Module's hook, documented there
            yield f"SemiCRF.{name}", member


@pytest.mark.parametrize("name,fn", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_docstrings_have_args_returns_raises(name, fn):
    doc = inspect.getdoc(fn) or ""
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    if params:
        assert "Args:" in doc, f"{name}: no Args"
        for p in params:
            assert f"{p}:" in doc or f"{p}," in doc, f"{name}: argument {p} undocumented"
    assert "Returns:" in doc, f"{name}: no Returns"
    if params:
        assert "Raises:" in doc, f"{name}: no Raises"
    assert len(doc.splitlines()) >= 5, f"{name}: a one-line docstring"

