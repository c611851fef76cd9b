"""Speaker turns in real speech: segment chained utterances by speaker, on held-out recordings.

Data: the Japanese Vowels data set (Kudo, Toyama and Shimbo, 1999): nine male
speakers each saying the vowel pair /ae/, every utterance turned into a series
of 12 LPC cepstrum coefficients per 6.4 ms frame, 7 to 29 frames long; 270
training and 370 test utterances recorded on different occasions. It ships
with the UCR/UEA archive inside the sktime 1.2.0 wheel on PyPI and is read
from there by ``ts_archive.py`` (no sktime import). Licence: the UCI Machine
Learning Repository distributes it under CC BY 4.0 (doi:10.24432/C5NS47);
sktime's code is BSD-3-Clause; please cite the UEA/UCR archive when you use it.
Get it once with ``--download`` or
``python -m pip download sktime==1.2.0 --no-deps -d ~/.cache/flashsemicrf``.

Task: as the time-series segmentation benchmark TSSB is built, real recordings
of known classes are chained into long sequences: each sequence is a chain of
utterances in which the speaker changes at every utterance (like turns in a
conversation), and the model must say who speaks when, frame by frame.
Training sequences are drawn afresh every epoch from the 270 training
utterances; held-out sequences use each of the 370 test utterances once.

The same small CNN encoder (two dilated convolutions, receptive field 13
frames) is trained with
  * ``semicrf``: the SemiCRF head, K = 29, with the constraints the task
    guarantees (``flashsemicrf.Constraints``): a speaker never follows
    themself, and a turn lasts 7 to 29 frames;
  * ``semicrf, no constraints``: the same head without them;
  * ``crf (K=1)``: SemiCRF with max_duration=1, a linear-chain CRF;
  * ``softmax``: a per-frame softmax;
and scored on the held-out sequences by segment F1 (a predicted turn must
match a true one exactly: start, end and speaker), boundary F1 (speaker
changes matched one-to-one within ``--tolerance`` frames) and per-frame
accuracy. A figure with the loss curves, one held-out sequence as truth and
predictions, and the semi-CRF's posterior marginals is saved to ``--plot``.

Run::

    python examples/speaker_turns.py --download     # once: fetches the 8 MB wheel
    python examples/speaker_turns.py                # about 1 minute on 2 CPU cores
    python examples/speaker_turns.py --quick        # CI smoke run, a few seconds

Measured with the defaults (seed 0, CPU, torch 2.14; the whole run took 53 s
on 2 cores at load ≈ 2, and 113 s with the cores shared by other jobs; the
metrics were identical in both runs)::

                       model  segment F1  boundary F1  accuracy  turns (pred / true)
                     semicrf       0.977        0.999     0.982        371 / 370
     semicrf, no constraints       0.951        0.989     0.967        362 / 370
                   crf (K=1)       0.622        0.930     0.959        411 / 370
                     softmax       0.564        0.898     0.956        438 / 370

Per frame all four are close: most frames lie inside a turn that every head
gets right. The softmax and the linear-chain CRF break turns into pieces or
shift their ends, so fewer than two thirds of their turns are exactly right;
the semi-CRF scores each turn as a whole with a duration model, and the
constraints (no speaker twice in a row, 7 to 29 frames) remove the remaining
merges and splits. Utterances are joined end to end, as in TSSB, so speaker
changes are abrupt; recognising who speaks is the harder part. ``--quick``
(6 epochs, a narrower encoder) took 23 s and gives lower but ordered numbers.

``--help`` needs only torch and numpy; matplotlib is imported only to draw.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import flashsemicrf as fsc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ts_archive  # noqa: E402  (next to this file)

DATASET = "JapaneseVowels"
SHORTEST, LONGEST = 7, 29  # frames per utterance, as the data set documents it


@dataclass
class Config:
    utterances: int
    epochs: int
    batch_size: int
    hidden: int
    lr: float
    tolerance: int
    seed: int
    plot: str | None
    data: str | None
    download: bool
    quick: bool
    backend: str


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="few epochs and a smaller encoder: a smoke run for CI")
    p.add_argument("--utterances", type=int, default=40,
                   help="utterances chained per sequence (40)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 40; 6 with --quick)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step (2)")
    p.add_argument("--hidden", type=int, default=None,
                   help="encoder width (default 32; 16 with --quick)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (3e-3)")
    p.add_argument("--tolerance", type=int, default=2, help="boundary tolerance in frames (2)")
    p.add_argument("--seed", type=int, default=0, help="seed of data chains and weights (0)")
    p.add_argument("--plot", default="speaker_turns.png",
                   help="where to save the figure, '' for none (speaker_turns.png; "
                        "needs matplotlib)")
    p.add_argument("--data", default=None,
                   help="the sktime 1.2.0 wheel, a folder holding it, or an unpacked data folder")
    p.add_argument("--download", action="store_true",
                   help="download the sktime 1.2.0 wheel (8 MB, no dependencies) if missing")
    p.add_argument("--backend", default="auto", help="flashsemicrf backend (auto)")
    a = p.parse_args(argv)
    return Config(
        utterances=a.utterances,
        epochs=a.epochs or (6 if a.quick else 40),
        batch_size=a.batch_size,
        hidden=a.hidden or (16 if a.quick else 32),
        lr=a.lr,
        tolerance=a.tolerance,
        seed=a.seed,
        plot=a.plot or None,
        data=a.data,
        download=a.download,
        quick=a.quick,
        backend=a.backend,
    )


def load_data(cfg: Config):
    """The TRAIN and TEST recordings, features standardised with the training statistics."""
    if cfg.download:
        try:
            ts_archive.load(DATASET, "TRAIN", cfg.data)
        except ts_archive.DataNotFound:
            print(f"downloading sktime {ts_archive.SKTIME_VERSION}'s wheel into "
                  f"{ts_archive.data_dir()} …")
            ts_archive.download()
    train = ts_archive.load(DATASET, "TRAIN", cfg.data)
    test = ts_archive.load(DATASET, "TEST", cfg.data)
    frames = np.concatenate(train.series)
    mean, std = frames.mean(0), frames.std(0)
    for rec in (train, test):
        rec.series = [(s - mean) / std for s in rec.series]
    return train, test


def chain(rec: ts_archive.Recordings, per_sequence: int, rng: np.random.Generator):
    """Utterance indices in chains of ``per_sequence``, no speaker twice in a row.

    Each utterance is used at most once. The next speaker is drawn among the
    others in proportion to how many utterances they have left, so that no
    speaker is left over at the end; any that still are (only the last
    speaker's own) are dropped and counted.
    """
    left = {c: list(rng.permutation(np.flatnonzero(rec.labels == c)))
            for c in range(len(rec.classes))}
    chains, current, prev = [], [], -1
    while True:
        options = [c for c, idx in left.items() if idx and c != prev]
        if not options:
            break
        weights = np.array([len(left[c]) for c in options], dtype=float)
        c = options[rng.choice(len(options), p=weights / weights.sum())]
        current.append(left[c].pop())
        prev = c
        if len(current) == per_sequence:
            chains.append(current)
            current, prev = [], -1
    if current:
        chains.append(current)
    dropped = sum(len(idx) for idx in left.values())
    return chains, dropped


def to_batch(rec: ts_archive.Recordings, chains) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded features (B, T, 12), labels (B, T) (−1 on padding) and lengths (B,)."""
    lengths = [sum(len(rec.series[i]) for i in ch) for ch in chains]
    T = max(lengths)
    x = torch.zeros(len(chains), T, rec.dims)
    y = torch.full((len(chains), T), -1, dtype=torch.long)
    for b, ch in enumerate(chains):
        t = 0
        for i in ch:
            n = len(rec.series[i])
            x[b, t:t + n] = torch.from_numpy(rec.series[i])
            y[b, t:t + n] = int(rec.labels[i])
            t += n
    return x, y, torch.tensor(lengths)


class Encoder(nn.Module):
    """Two dilated 1-D convolutions with a residual path, the input passed through:
    (B, T, D) → (B, T, hidden + D)."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.out_dim = hidden + features
        self.conv1 = nn.Conv1d(features, hidden, 5, padding=2)
        self.conv2 = nn.Conv1d(hidden, hidden, 5, padding=4, dilation=2)

    def forward(self, x):
        h = F.gelu(self.conv1(x.transpose(1, 2)))
        h = h + F.gelu(self.conv2(h))
        return torch.cat([h.transpose(1, 2), x], -1)


def _padding(lengths, T):
    return torch.arange(T)[None, :] >= lengths[:, None]


class SoftmaxTagger(nn.Module):
    def __init__(self, features: int, classes: int, cfg: Config):
        super().__init__()
        self.encoder = Encoder(features, cfg.hidden)
        self.out = nn.Linear(self.encoder.out_dim, classes)

    def loss(self, x, labels, lengths):
        logits = self.out(self.encoder(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)

    @torch.no_grad()
    def predict(self, x, lengths):
        pred = self.out(self.encoder(x)).argmax(-1)
        return pred.masked_fill(_padding(lengths, x.shape[1]), -1)


class CRFTagger(nn.Module):
    """The encoder and a SemiCRF head, optionally under constraints; K = 1 is a linear chain."""

    def __init__(self, features: int, classes: int, K: int, cfg: Config,
                 constraints: fsc.Constraints | None = None):
        super().__init__()
        self.K, self.constraints = K, constraints
        self.encoder = Encoder(features, cfg.hidden)
        self.head = fsc.SemiCRF(classes, K, hidden_dim=self.encoder.out_dim,
                                boundary_projections=K > 1, backend=cfg.backend)

    def potentials(self, x, lengths) -> dict:
        kw = self.head.potentials(self.encoder(x), lengths)
        return self.constraints.apply(kw) if self.constraints is not None else kw

    def loss(self, x, labels, lengths):
        """Mean NLL per sequence divided by the mean length: nats per frame."""
        gold = fsc.labels_to_segments(labels.clamp(min=0), lengths, self.K)
        return fsc.nll(gold, **self.potentials(x, lengths)).mean() / lengths.float().mean()

    @torch.no_grad()
    def predict(self, x, lengths):
        _, segments = fsc.viterbi(**self.potentials(x, lengths))
        return fsc.segments_to_labels(segments, x.shape[0], x.shape[1])

    @torch.no_grad()
    def marginals(self, x, lengths):
        return fsc.marginals(**self.potentials(x, lengths))


def turns(labels: np.ndarray) -> set[tuple[int, int, int]]:
    """Maximal runs (start, end, label) of a 1-D label array."""
    cut = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.r_[0, cut]
    ends = np.r_[cut, len(labels)]
    return {(int(s), int(e), int(labels[s])) for s, e in zip(starts, ends)}


def matched_within(true: list[int], pred: list[int], tol: int) -> int:
    """One-to-one matches of two sorted position lists within ``tol`` (greedy is optimal here)."""
    hits, j = 0, 0
    for t in true:
        while j < len(pred) and pred[j] < t - tol:
            j += 1
        if j < len(pred) and pred[j] <= t + tol:
            hits, j = hits + 1, j + 1
    return hits


def scores(pred: torch.Tensor, truth: torch.Tensor, lengths: torch.Tensor, tol: int) -> dict:
    """Segment F1, boundary F1 within ``tol``, accuracy, and the segment counts."""
    n = dict(seg_hits=0, seg_pred=0, seg_true=0, bnd_hits=0, bnd_pred=0, bnd_true=0, correct=0)
    for p, t, L in zip(pred.numpy(), truth.numpy(), lengths.tolist()):
        p, t = p[:L], t[:L]
        n["correct"] += int((p == t).sum())
        tp, tt = turns(p), turns(t)
        n["seg_hits"] += len(tp & tt)
        n["seg_pred"] += len(tp)
        n["seg_true"] += len(tt)
        bp = sorted(s for s, _, _ in tp if s > 0)  # a boundary: a turn starting after 0
        bt = sorted(s for s, _, _ in tt if s > 0)
        n["bnd_hits"] += matched_within(bt, bp, tol)
        n["bnd_pred"] += len(bp)
        n["bnd_true"] += len(bt)

    def f1(hits, a, b):
        return 2 * hits / (a + b) if a + b else 1.0

    return {"segment F1": f1(n["seg_hits"], n["seg_pred"], n["seg_true"]),
            "boundary F1": f1(n["bnd_hits"], n["bnd_pred"], n["bnd_true"]),
            "accuracy": n["correct"] / int(lengths.sum()),
            "predicted segments": n["seg_pred"], "true segments": n["seg_true"]}


def train(model: nn.Module, train_rec, cfg: Config, seed: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(seed)  # the same chains for every model
    losses = []
    for _ in range(cfg.epochs):
        chains, _ = chain(train_rec, cfg.utterances, rng)
        x, y, lengths = to_batch(train_rec, chains)
        order = rng.permutation(len(chains))
        model.train()
        for i in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[i:i + cfg.batch_size])
            L = lengths[idx]
            T = int(L.max())
            opt.zero_grad()
            loss = model.loss(x[idx, :T], y[idx, :T], L)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(loss.item())
    model.eval()
    return losses


def plot(losses: dict, test, preds: dict, marg, classes, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed, so no figure was saved to {path} "
              f"(pip install matplotlib, or pass --plot '')", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    _, y, lengths = test
    L = int(lengths[0])
    fig, axes = plt.subplots(3, 1, figsize=(13, 9),
                             gridspec_kw=dict(height_ratios=[2, 1.6, 1.6]))
    ax = axes[0]
    for name, curve in losses.items():
        c = np.asarray(curve)
        k = max(1, len(c) // 25)
        smooth = np.convolve(c, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats / frame)")
    ax.set_title("Training loss (CRFs: sequence NLL / length; softmax: cross-entropy)")
    ax.legend()

    cmap = ListedColormap(plt.get_cmap("tab10").colors[:len(classes)])
    ax = axes[1]
    tracks = {"truth": y[0]} | {name: p[0] for name, p in preds.items()}
    image = np.stack([t[:L].numpy() for t in tracks.values()]).astype(float)
    ax.imshow(np.ma.masked_less(image, 0), aspect="auto", interpolation="nearest", cmap=cmap,
              vmin=-0.5, vmax=len(classes) - 0.5, extent=(0, L, len(tracks) - 0.5, -0.5))
    ax.set_yticks(range(len(tracks)), list(tracks))
    ax.set_title("First held-out sequence: speaker per frame (one colour per speaker)")

    ax = axes[2]
    probs = marg.labels[0, :L].numpy().T  # (C, L)
    ax.stackplot(np.arange(L), probs, colors=cmap.colors, step="post")
    ax.set_xlim(0, L)
    ax.set_ylim(0, 1)
    ax.set_xlabel("frame (6.4 ms)")
    ax.set_title("semicrf posterior marginals P(speaker c at frame t), stacked")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    try:
        train_rec, test_rec = load_data(cfg)
    except (ts_archive.DataNotFound, RuntimeError) as err:
        raise SystemExit(f"speaker_turns.py: {err}") from None
    C, D = len(train_rec.classes), train_rec.dims
    test_chains, dropped = chain(test_rec, cfg.utterances, np.random.default_rng(cfg.seed + 1))
    test = to_batch(test_rec, test_chains)
    print(f"{DATASET} from {train_rec.source}: {len(train_rec.series)} training and "
          f"{len(test_rec.series)} held-out utterances, {C} speakers, {D} features, "
          f"{train_rec.lengths.min()}–{test_rec.lengths.max()} frames each")
    print(f"held out: {len(test_chains)} sequences of ≤ {cfg.utterances} utterances "
          f"({int(test[2].sum())} frames, {dropped} utterances left over); "
          f"K = {LONGEST}, boundary tolerance {cfg.tolerance} frames")

    turn_rules = (fsc.Constraints.allow_all(train_rec.classes, max_duration=LONGEST)
                  .forbid_repeats().with_durations(minimum=SHORTEST))
    gold = fsc.labels_to_segments(test[1].clamp(min=0), test[2], LONGEST)
    turn_rules.check(gold)  # the held-out truth obeys the rules the model is given
    makers = {
        "semicrf": lambda: CRFTagger(D, C, LONGEST, cfg, turn_rules),
        "semicrf, no constraints": lambda: CRFTagger(D, C, LONGEST, cfg),
        "crf (K=1)": lambda: CRFTagger(D, C, 1, cfg),
        "softmax": lambda: SoftmaxTagger(D, C, cfg),
    }
    results, losses, preds, models = {}, {}, {}, {}
    for name, make in makers.items():
        torch.manual_seed(cfg.seed)  # the same encoder initialisation for every head
        start = time.time()
        model = models[name] = make()
        losses[name] = train(model, train_rec, cfg, cfg.seed)
        preds[name] = model.predict(test[0], test[2])
        results[name] = scores(preds[name], test[1], test[2], cfg.tolerance)
        results[name]["seconds"] = time.time() - start
        print(f"  trained and evaluated {name} in {results[name]['seconds']:.1f} s")

    print(f"\nheld-out results ({len(test_chains)} sequences, {results['softmax']['true segments']}"
          f" turns, boundary tolerance {cfg.tolerance} frames):")
    print(f"{'model':>24}  {'segment F1':>10}  {'boundary F1':>11}  {'accuracy':>8}  "
          f"{'turns (pred / true)':>19}  {'train+eval s':>12}")
    for name, r in results.items():
        print(f"{name:>24}  {r['segment F1']:10.3f}  {r['boundary F1']:11.3f}  "
              f"{r['accuracy']:8.3f}  {r['predicted segments']:>9} / {r['true segments']:<7}  "
              f"{r['seconds']:12.1f}")
    if cfg.plot:
        marg = models["semicrf"].marginals(test[0][:1], test[2][:1])
        plot(losses, test, preds, marg, train_rec.classes, cfg.plot)
        print(f"figure saved to {cfg.plot}")
    print(f"total {time.time() - t0:.0f} s")
    return {"results": results, "train": train_rec, "test": test_rec, "dropped": dropped}


if __name__ == "__main__":
    main()
