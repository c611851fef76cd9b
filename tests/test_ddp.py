"""The SemiCRF head under DistributedDataParallel: two CPU processes (gloo),
each with half the batch, give the gradients of the single-process mean NLL
of the whole batch (DDP averages the ranks' gradients, and each rank's loss is
the mean over its equal half)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flashsemicrf as F

WORLD = 2
B, T, C, K, FEATURES, H = 4, 48, 3, 6, 5, 8


class Tagger(nn.Module):
    """A one-layer CNN encoder and the SemiCRF head; forward returns the loss."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(FEATURES, H, kernel_size=5, padding=2)
        self.head = F.SemiCRF(C, K, hidden_dim=H, boundary_projections=True,
                              duration_prior="negative_binomial", duration_mean=3.0)

    def forward(self, x, lengths, segments):  # x (B, T, FEATURES)
        hidden = torch.relu(self.encoder(x.transpose(1, 2))).transpose(1, 2)
        return self.head(hidden, segments, lengths)


def make_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, FEATURES, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 31, 40, 17])
    # Runs of 3 positions with random labels: equal neighbours merge, then split at K.
    labels = torch.randint(0, C, (B, T // 3), generator=g).repeat_interleave(3, dim=1)
    return x, lengths, F.labels_to_segments(labels, lengths, K)


def shard(x, lengths, segments, rank):
    """Sequences [rank·B/2, (rank + 1)·B/2), segments renumbered from batch 0."""
    lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
    rows = segments[(segments[:, 0] >= lo) & (segments[:, 0] < hi)].clone()
    rows[:, 0] -= lo
    return x[lo:hi], lengths[lo:hi], rows


def make_model(state=None):
    torch.manual_seed(0)
    model = Tagger().double()
    with torch.no_grad():  # non-zero transitions and boundary terms
        model.head.transition.normal_()
        model.head.start_transition.normal_()
        model.head.end_transition.normal_()
    if state is not None:
        model.load_state_dict(state)
    return model


def _worker(rank: int, init_file: str, out_dir: str, state: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.parallel.DistributedDataParallel(make_model(state))
        x, lengths, segments = shard(*make_batch(), rank)
        loss = model(x, lengths, segments)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks are done communicating before either tears its group
        # down: without it a rank was once aborted by gloo ("terminate called
        # without an active exception", SIGABRT) in a loaded CI run.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_gradients_equal_single_process(tmp_path):
    model = make_model()
    x, lengths, segments = make_batch()
    full = model(x, lengths, segments)
    full.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in expected.values())

    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), state), nprocs=WORLD, join=True)

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    halves = torch.stack([r["loss"] for r in results])
    print(f"full-batch mean NLL {full.item():.6f}, ranks {halves.tolist()}")
    assert torch.allclose(halves.mean(), full.detach(), atol=1e-9, rtol=0)
    for rank, r in enumerate(results):
        assert r["grads"].keys() == expected.keys()
        for name, g in r["grads"].items():
            diff = (g - expected[name]).abs().max().item()
            print(f"rank {rank} {name}: max |diff| = {diff:.2e}")
            assert diff <= 1e-9, f"rank {rank}: gradient of {name} differs by {diff:.2e}"
