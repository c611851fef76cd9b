"""Constraints: masks from label schemes, applied to the potentials, and feasibility checks.

The independent computation is a plain-Python enumeration of every
segmentation of tiny problems, scored by the model's formula and filtered by
the constraints with plain list look-ups.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashsemicrf as fsc
from flashsemicrf import Constraints

F64 = torch.float64


def segmentations(L: int, K: int, C: int):
    """Every segmentation of [0, L): lists of (start, duration, label)."""
    if L == 0:
        yield []
        return
    for d in range(1, min(K, L) + 1):
        for c in range(C):
            for rest in segmentations(L - d, K, C):
                yield [(0, d, c)] + [(s + d, dd, cc) for s, dd, cc in rest]


def plain_score(segs, kw, b, L):
    """The model's score of one segmentation, in plain Python floats."""
    scores = kw["scores"][b].tolist()
    trans = kw["transition"].tolist()
    dur = kw["duration"].tolist()
    total = 0.0
    for i, (s, d, c) in enumerate(segs):
        total += sum(scores[u][c] for u in range(s, s + d)) + dur[d - 1][c]
        if i > 0:
            prev = segs[i - 1][2]
            total += trans[d - 1][prev][c] if kw["transition"].dim() == 3 else trans[prev][c]
        elif kw.get("start_transition") is not None:
            total += kw["start_transition"][c].item()
        if s + d == L and kw.get("end_transition") is not None:
            total += kw["end_transition"][c].item()
    return total


def allowed(segs, con: Constraints) -> bool:
    """Plain-Python reading of the masks."""
    trans, start, end = con.transitions.tolist(), con.start.tolist(), con.end.tolist()
    durs = con.durations.tolist() if con.durations is not None else None
    for i, (_, d, c) in enumerate(segs):
        if durs is not None and (d > len(durs) or not durs[d - 1][c]):
            return False
        if i == 0 and not start[c]:
            return False
        if i > 0 and not trans[segs[i - 1][2]][c]:
            return False
    return end[segs[-1][2]]


def logsumexp(values):
    values = [v for v in values if v > -math.inf]
    if not values:
        return -math.inf
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def random_problem(seed, B, T, K, C, *, kcc=False, start_end=True):
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        scores=torch.randn(B, T, C, generator=g, dtype=F64),
        transition=torch.randn(*((K,) if kcc else ()), C, C, generator=g, dtype=F64),
        duration=torch.randn(K, C, generator=g, dtype=F64),
        lengths=torch.randint(1, T + 1, (B,), generator=g),
    )
    if start_end:
        kw["start_transition"] = torch.randn(C, generator=g, dtype=F64)
        kw["end_transition"] = torch.randn(C, generator=g, dtype=F64)
    return kw


def random_constraints(seed, K, C, density=0.7):
    g = torch.Generator().manual_seed(seed + 1000)

    def draw(*shape):
        return torch.rand(*shape, generator=g) < density

    return Constraints(draw(C, C), draw(C), draw(C), draw(K, C))


def enumerate_log_z(kw, con, b):
    L = int(kw["lengths"][b])
    K, C = kw["duration"].shape
    return logsumexp([plain_score(s, kw, b, L) for s in segmentations(L, K, C) if allowed(s, con)])


@pytest.mark.parametrize("kcc", [False, True], ids=["cc", "kcc"])
@pytest.mark.parametrize("start_end", [True, False], ids=["startend", "nostartend"])
@pytest.mark.parametrize("seed", range(6))
def test_log_partition_with_masks_equals_filtered_enumeration(seed, kcc, start_end):
    B, T, K, C = 3, 6, 3, 3
    kw = random_problem(seed, B, T, K, C, kcc=kcc, start_end=start_end)
    con = random_constraints(seed, K, C)
    got = fsc.log_partition(**con.apply(kw))
    want = [enumerate_log_z(kw, con, b) for b in range(B)]
    print("got", got.tolist(), "want", want)
    for g_, w in zip(got.tolist(), want):
        assert (g_ == w == -math.inf) or abs(g_ - w) < 1e-9


def test_builders_compose_and_match_enumeration():
    """Named builders (spans, repeats, duration ranges) against the enumeration."""
    B, T, K, C = 2, 7, 4, 3
    kw = random_problem(7, B, T, K, C)
    con = (Constraints.spans(["PER", "LOC"], outside_follows_outside=False, max_duration=K)
           .with_durations(minimum={"PER": 2}, maximum={"LOC": 2})
           .with_start(["O", "PER"]))
    plain = con.durations.tolist()
    assert [row[1] for row in plain] == [False, True, True, True]  # PER: 2 … K
    assert [row[2] for row in plain] == [True, True, False, False]  # LOC: 1 … 2
    assert not con.transitions[0, 0] and con.transitions[1, 1] and con.transitions[2, 2]
    got = fsc.log_partition(**con.apply(kw))
    for b in range(B):
        want = enumerate_log_z(kw, con, b)
        assert abs(got[b].item() - want) < 1e-9, (b, got[b].item(), want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), T=st.integers(1, 6), K=st.integers(1, 4),
       C=st.integers(1, 4), density=st.sampled_from([0.3, 0.6, 0.9]))
def test_viterbi_never_returns_a_forbidden_segmentation(seed, T, K, C, density):
    B = 2
    kw = random_problem(seed, B, T, K, C)
    con = random_constraints(seed, K, C, density)
    best, segs = fsc.viterbi(**con.apply(kw))
    con.check(segs)  # raises on a forbidden row
    assert con.feasible(segs, B)[segs[:, 0].unique()].all()
    for b in range(B):
        L = int(kw["lengths"][b])
        options = [s for s in segmentations(L, K, C) if allowed(s, con)]
        rows = segs[segs[:, 0] == b]
        if not options:  # nothing allowed: -inf and no rows, never NaN
            assert best[b].item() == -math.inf and len(rows) == 0
            continue
        want = max(plain_score(s, kw, b, L) for s in options)
        assert abs(best[b].item() - want) < 1e-9
        path = [tuple(r) for r in rows[:, 1:].tolist()]
        assert path in [[tuple(x) for x in s] for s in options]


@pytest.mark.parametrize("seed", range(8))
def test_feasible_agrees_with_finite_score(seed):
    B, T, K, C = 4, 12, 4, 3
    kw = random_problem(seed, B, T, K, C)
    con = random_constraints(seed, K, C, density=0.8)
    draws = fsc.sample(**kw, num_samples=6, generator=torch.Generator().manual_seed(seed))
    masked = con.apply(kw)
    for k in range(6):
        segs = draws[draws[:, 0] == k, 1:]
        finite = torch.isfinite(fsc.score(segs, **masked))
        assert torch.equal(con.feasible(segs, B), finite)
        if finite.all():
            con.check(segs)
        else:
            with pytest.raises(ValueError, match=r"segments row \d+ \(batch \d"):
                con.check(segs)


def test_check_names_the_first_offending_row():
    con = Constraints.allow_all(["O", "PER", "LOC"], max_duration=4).forbid_repeats(["PER"])
    segs = torch.tensor([[0, 0, 2, 0], [0, 2, 1, 1], [1, 0, 3, 2], [1, 3, 2, 1], [1, 5, 1, 1]])
    with pytest.raises(ValueError) as err:
        con.check(segs)
    assert str(err.value) == ("segments row 4 (batch 1, start 5, duration 1, label 1): "
                              "label 'PER' (1) may not follow label 'PER' (1)")
    con = Constraints.allow_all(3, max_duration=4).with_durations(minimum=[1, 2, 1], maximum=3)
    with pytest.raises(ValueError, match=r"row 1 .*duration 1 is not allowed for label 1 "
                                         r"\(allowed: 2-3\)"):
        con.check(torch.tensor([[0, 0, 3, 0], [0, 3, 1, 1]]))
    con = Constraints.allow_all(3).with_start([0]).with_end([2])
    with pytest.raises(ValueError, match=r"row 0 .*label 1 may not begin a sequence"):
        con.check(torch.tensor([[0, 0, 3, 1]]))
    with pytest.raises(ValueError, match=r"row 1 .*label 1 may not end a sequence"):
        con.check(torch.tensor([[0, 0, 3, 0], [0, 3, 1, 1], [1, 0, 1, 0], [1, 1, 1, 2]]))
    con.check(torch.zeros(0, 4, dtype=torch.long))  # nothing to violate


# Allowed pairs written out by hand from each scheme's definition ("^" = start, "$" = end).
BIO_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
BIO_ALLOWED = """
^>O ^>B-PER ^>B-LOC
O>O O>B-PER O>B-LOC O>$
B-PER>O B-PER>B-PER B-PER>I-PER B-PER>B-LOC B-PER>$
I-PER>O I-PER>B-PER I-PER>I-PER I-PER>B-LOC I-PER>$
B-LOC>O B-LOC>B-PER B-LOC>B-LOC B-LOC>I-LOC B-LOC>$
I-LOC>O I-LOC>B-PER I-LOC>B-LOC I-LOC>I-LOC I-LOC>$
"""
IOB1_ALLOWED = """
^>O ^>I-PER ^>I-LOC
O>O O>I-PER O>I-LOC O>$
B-PER>O B-PER>B-PER B-PER>I-PER B-PER>I-LOC B-PER>$
I-PER>O I-PER>B-PER I-PER>I-PER I-PER>I-LOC I-PER>$
B-LOC>O B-LOC>I-PER B-LOC>B-LOC B-LOC>I-LOC B-LOC>$
I-LOC>O I-LOC>I-PER I-LOC>B-LOC I-LOC>I-LOC I-LOC>$
"""
BIOUL_LABELS = ["O", "B-X", "I-X", "L-X", "U-X", "U-Y"]
BIOUL_ALLOWED = """
^>O ^>B-X ^>U-X ^>U-Y
O>O O>B-X O>U-X O>U-Y O>$
B-X>I-X B-X>L-X
I-X>I-X I-X>L-X
L-X>O L-X>B-X L-X>U-X L-X>U-Y L-X>$
U-X>O U-X>B-X U-X>U-X U-X>U-Y U-X>$
U-Y>O U-Y>B-X U-Y>U-X U-Y>U-Y U-Y>$
"""
BMES_LABELS = ["B", "M", "E", "S"]
BMES_ALLOWED = """
^>B ^>S
B>M B>E
M>M M>E
E>B E>S E>$
S>B S>S S>$
"""


def parse_pairs(text, labels):
    index = {name: i for i, name in enumerate(labels)}
    C = len(labels)
    out = set()
    for token in text.split():
        a, b = token.split(">")
        out.add((C if a == "^" else index[a], C + 1 if b == "$" else index[b]))
    return out


def allowed_pairs(con: Constraints):
    C = con.num_labels
    pairs = {(i, j) for i in range(C) for j in range(C) if con.transitions[i, j]}
    pairs |= {(C, j) for j in range(C) if con.start[j]}
    pairs |= {(i, C + 1) for i in range(C) if con.end[i]}
    return pairs


@pytest.mark.parametrize("scheme, labels, table", [
    ("BIO", BIO_LABELS, BIO_ALLOWED),
    ("IOB1", BIO_LABELS, IOB1_ALLOWED),
    ("BIOUL", BIOUL_LABELS, BIOUL_ALLOWED),
    ("BMES", BMES_LABELS, BMES_ALLOWED),
])
def test_from_tags_matches_the_scheme(scheme, labels, table):
    con = Constraints.from_tags(scheme, labels)
    want = parse_pairs(table, labels)
    assert allowed_pairs(con) == want
    # AllenNLP's pair list (start = C, end = C + 1) round-trips through from_pairs.
    again = Constraints.from_pairs(sorted(want), labels)
    assert allowed_pairs(again) == want
    # An index -> tag dict, as AllenNLP takes it, gives the same constraints.
    as_dict = Constraints.from_tags(scheme, dict(enumerate(labels)))
    assert torch.equal(as_dict.transitions, con.transitions)


def test_bioes_is_bioul_with_other_letters():
    bioes = Constraints.from_tags("BIOES", ["O", "B-X", "I-X", "E-X", "S-X", "S-Y"], 3)
    bioul = Constraints.from_tags("BIOUL", BIOUL_LABELS, 3)
    for name in ("transitions", "start", "end", "durations"):
        assert torch.equal(getattr(bioes, name), getattr(bioul, name))


def test_from_tags_durations_allow_only_self_repeating_tags():
    con = Constraints.from_tags("BIOUL", BIOUL_LABELS, max_duration=3)
    # d = 1 always; d > 1 only for tags that may follow themselves: O, I-X, U-X, U-Y.
    assert con.durations.tolist() == [[True] * 6] + [[True, False, True, False, True, True]] * 2


def valid_bio(tags):
    """A tag sequence is valid BIO when every I-x follows B-x or I-x."""
    for i, t in enumerate(tags):
        if t.startswith("I-") and (i == 0 or tags[i - 1][2:] != t[2:] or tags[i - 1] == "O"):
            return False
    return True


def valid_bioul(tags):
    """Valid BIOUL: entities are U-x, or B-x I-x* L-x; nothing else."""
    i = 0
    while i < len(tags):
        t = tags[i]
        if t == "O" or t.startswith("U-"):
            i += 1
            continue
        if not t.startswith("B-"):
            return False
        j = i + 1
        while j < len(tags) and tags[j] == "I-" + t[2:]:
            j += 1
        if j == len(tags) or tags[j] != "L-" + t[2:]:
            return False
        i = j + 1
    return True


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), K=st.integers(1, 4),
       scheme=st.sampled_from(["BIO", "BIOUL"]))
def test_decoded_segments_spell_valid_tags(seed, K, scheme):
    """With K > 1 a segment stands for d copies of its tag; the result is a valid tagging."""
    labels = BIO_LABELS if scheme == "BIO" else BIOUL_LABELS
    valid = valid_bio if scheme == "BIO" else valid_bioul
    B, T, C = 3, 15, len(labels)
    kw = random_problem(seed, B, T, K, C)
    kw["scores"] = 3 * kw["scores"]
    con = Constraints.from_tags(scheme, labels, max_duration=K)
    _, segs = fsc.viterbi(**con.apply(kw))
    tags = fsc.segments_to_labels(segs, B, T)
    for b in range(B):
        seq = [labels[t] for t in tags[b, : int(kw["lengths"][b])].tolist()]
        assert valid(seq), seq


def test_apply_masks_without_touching_inputs_and_gradients_stay_finite():
    B, T, K, C = 2, 9, 3, 3
    kw = random_problem(3, B, T, K, C, kcc=True)
    kw = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
    before = {k: v.detach().clone() for k, v in kw.items()}
    con = (Constraints.allow_all(C, max_duration=K).forbid_repeats()
           .with_durations(minimum=2).with_end([1]))
    masked = con.apply(kw)
    for k, v in kw.items():
        assert torch.equal(v.detach(), before[k]), k  # nothing modified in place
    assert masked["transition"].shape == (K, C, C)
    assert torch.isinf(masked["transition"][:, [0, 1, 2], [0, 1, 2]]).all()
    fsc.log_partition(**masked).sum().backward()
    for k in ("transition", "duration", "end_transition", "scores"):
        assert torch.isfinite(kw[k].grad).all(), k
    assert (kw["transition"].grad[:, [0, 1, 2], [0, 1, 2]] == 0).all()
    assert (kw["duration"].grad[0] == 0).all()
    assert (kw["end_transition"].grad[[0, 2]] == 0).all()


def test_apply_creates_start_and_end_when_absent_and_masks_match():
    B, T, K, C = 2, 6, 2, 3
    kw = random_problem(4, B, T, K, C, start_end=False)
    con = Constraints.allow_all(C, max_duration=K).with_start([2]).with_end([0, 1])
    masked = con.apply(kw)
    assert masked["start_transition"].tolist() == [-math.inf, -math.inf, 0.0]
    assert masked["end_transition"].tolist() == [0.0, 0.0, -math.inf]
    add = con.masks(F64)
    by_hand = dict(kw, transition=kw["transition"] + add["transition"],
                   duration=kw["duration"] + add["duration"],
                   start_transition=add["start_transition"], end_transition=add["end_transition"])
    assert torch.equal(fsc.log_partition(**masked), fsc.log_partition(**by_hand))
    untouched = Constraints.allow_all(C).apply(kw)
    assert "start_transition" not in untouched and untouched["duration"] is kw["duration"]


def test_nothing_allowed_gives_minus_inf_not_nan():
    B, T, K, C = 2, 5, 2, 2
    kw = random_problem(5, B, T, K, C)
    kw = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
    con = Constraints.allow_all(C, max_duration=K).with_durations(minimum=2).forbid_repeats()
    con = con.forbid_transitions([(0, 1)])  # only 1 -> 0 left: lengths ≥ 5 need 3 segments
    kw["lengths"] = torch.tensor([5, 5])
    log_z = fsc.log_partition(**con.apply(kw))
    assert (log_z == -math.inf).all()
    log_z.sum().backward()
    assert all(torch.equal(kw[k].grad, torch.zeros_like(kw[k].grad))
               for k in ("scores", "transition", "duration"))


def test_head_potentials_plug_in():
    """The dict SemiCRF.potentials returns goes through apply unchanged in meaning."""
    torch.manual_seed(0)
    C, K, H, B, T = 3, 4, 5, 2, 11
    head = fsc.SemiCRF(C, K, hidden_dim=H)
    hidden = torch.randn(B, T, H)
    con = Constraints.spans(["A", "B"], outside_follows_outside=False, max_duration=K)
    kw = con.apply(head.potentials(hidden))
    _, pred = fsc.viterbi(**kw)
    con.check(pred)
    gold = fsc.labels_to_segments(torch.randint(1, C, (B, T)), None, K)
    con.check(gold)
    loss = fsc.nll(gold, **kw).mean()
    loss.backward()
    assert torch.isfinite(loss) and head.transition.grad[0, 0] == 0


BAD_INPUT = [
    (lambda: Constraints.from_tags("BILOU", BIO_LABELS), "constraint_type must be one of"),
    (lambda: Constraints.from_tags("BIO", ["O", "X-PER"]), "'X-PER' is not a BIO tag"),
    (lambda: Constraints.from_tags("BIO", ["O", "BPER"]), "'BPER' is not a BIO tag"),
    (lambda: Constraints.from_tags("BMES", ["O", "B"]), "'O' is not a BMES tag"),
    (lambda: Constraints.from_tags("BIO", {1: "O", 2: "B-X"}), "keys"),
    (lambda: Constraints.from_tags("BIO", ["O", "O"]), "distinct"),
    (lambda: Constraints.from_tags("BIO", ["O"], max_duration=0), "max_duration"),
    (lambda: Constraints.allow_all(0), "labels must be an int ≥ 1"),
    (lambda: Constraints.allow_all("OPER"), "string"),
    (lambda: Constraints.allow_all(["O", "PER"]).forbid_repeats(["LOC"]), "unknown label 'LOC'"),
    (lambda: Constraints.allow_all(2).forbid_repeats(["O"]), "no label names"),
    (lambda: Constraints.allow_all(2).forbid_transitions([(0, 2)]), "label 2 is not"),
    (lambda: Constraints.allow_all(2).with_durations(maximum=2), "no duration mask"),
    (lambda: Constraints.allow_all(2, 5).with_durations(minimum=3, maximum=2), "minimum 3 exceeds"),
    (lambda: Constraints.allow_all(2, 5).with_durations(maximum=6), "exceeds K = 5"),
    (lambda: Constraints.allow_all(2, 5).with_durations(minimum=0), "≥ 1"),
    (lambda: Constraints.allow_all(2, 5).with_durations(minimum=[1, 2, 3]), "2 ints"),
    (lambda: Constraints.from_pairs([(0, 4)], 2), "outside the 2 labels"),
    (lambda: Constraints.from_pairs([(2, 3)], 2), "outside the 2 labels"),
    (lambda: Constraints.from_pairs([(0, 2)], 2), "into the start"),
    (lambda: Constraints(torch.ones(2, 3, dtype=torch.bool)), "shape"),
    (lambda: Constraints(torch.ones(2, 2)), "bool"),
    (lambda: Constraints(torch.ones(2, 2, dtype=torch.bool), labels=("a",)), "2 strings"),
    (lambda: Constraints.allow_all(2) & Constraints.allow_all(3), "2 and 3 labels"),
    (lambda: Constraints.allow_all(2, 3) & Constraints.allow_all(2, 4), "K = 3 and 4"),
]


@pytest.mark.parametrize("make, match", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_raises_a_clear_error(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_apply_and_check_reject_mismatched_inputs():
    kw = random_problem(0, 1, 4, 3, 2)
    with pytest.raises(ValueError, match="C = 3"):
        Constraints.allow_all(3).apply(kw)
    with pytest.raises(ValueError, match="K = 4 but duration has K = 3"):
        Constraints.allow_all(2, max_duration=4).apply(kw)
    with pytest.raises(ValueError, match="'duration'"):
        Constraints.allow_all(2).apply({"transition": kw["transition"]})
    con = Constraints.allow_all(2)
    with pytest.raises(TypeError, match="integer tensor"):
        con.check(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="label outside"):
        con.check(torch.tensor([[0, 0, 2, 2]]))
    with pytest.raises(ValueError, match="sorted"):
        con.check(torch.tensor([[0, 2, 2, 0], [0, 0, 2, 1]]))
    with pytest.raises(ValueError, match="batch_size = 1"):
        con.feasible(torch.tensor([[1, 0, 2, 0]]), batch_size=1)


def test_and_intersects():
    a = Constraints.allow_all(["O", "X"], max_duration=3).with_durations(maximum={"X": 2})
    b = Constraints.allow_all(["O", "X"]).forbid_repeats(["O"]).with_start(["X"])
    both = a & b
    assert both.transitions.tolist() == [[False, True], [True, True]]
    assert both.start.tolist() == [False, True]
    assert both.durations[:, 1].tolist() == [True, True, False]
    assert both.labels == ("O", "X")


def test_the_guide_section_runs(capsys):
    """The code in docs/guide.md's constraints section runs and prints what it says."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    section = guide.split("## Constraints: allowed label pairs")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/guide.md", "exec"), {})
    out = capsys.readouterr().out
    assert ("segments row 2 (batch 0, start 8, duration 32, label 0): duration 32 is not "
            "allowed for label 'O' (0) (allowed: 1-8)") in out
    assert "tensor([False, False])" in out


def test_from_pairs_takes_numpy_and_tensor_indices():
    import numpy as np

    pairs = [(0, 1), (1, 0), (2, 0), (1, 3)]  # 2 = start, 3 = end
    want = allowed_pairs(Constraints.from_pairs(pairs, 2))
    assert want == set(pairs)
    assert allowed_pairs(Constraints.from_pairs(np.array(pairs), 2)) == want
    assert allowed_pairs(Constraints.from_pairs(torch.tensor(pairs), 2)) == want
    with pytest.raises(ValueError, match="integer pairs"):
        Constraints.from_pairs([(0.0, 1.0)], 2)
