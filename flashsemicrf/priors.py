"""Duration priors: log-pmfs over d = 1 … K with a few parameters per label.

Each returns a (K, C) table of log P(d) that can serve as the ``duration``
input of every public function; the SemiCRF head (flashsemicrf/nn.py) learns
their parameters with ``duration_prior=...`` (docs/guide.md, "Duration priors").
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

Tensor = torch.Tensor


def geometric_log_pmf(logit: Tensor, K: int) -> Tensor:
    """(K, C) log P(d), d = 1 … K, of a geometric distribution on {1, 2, …}.

    P(d) = p (1 − p)^(d − 1) with success probability p = sigmoid(logit) (C,);
    mean 1 / p. Mass beyond K is dropped, so the K values sum to 1 − (1 − p)^K.

    Args:
        logit: (C,) logit of the success probability p, per label.
        K: the longest duration.

    Returns:
        (K, C) tensor: row d − 1 is log P(d) per label, differentiable with
        respect to the parameters.
    """
    k = torch.arange(K, dtype=logit.dtype, device=logit.device)[:, None]  # d − 1
    return F.logsigmoid(logit) + k * F.logsigmoid(-logit)


def poisson_log_pmf(log_rate: Tensor, K: int) -> Tensor:
    """(K, C) log P(d), d = 1 … K, of a Poisson shifted to start at 1.

    d − 1 ~ Poisson(λ) with λ = exp(log_rate); mean 1 + λ. Mass beyond K is
    dropped.

    Args:
        log_rate: (C,) log λ per label.
        K: the longest duration.

    Returns:
        (K, C) tensor: row d − 1 is log P(d) per label, differentiable with
        respect to the parameters.
    """
    k = torch.arange(K, dtype=log_rate.dtype, device=log_rate.device)[:, None]
    return k * log_rate - log_rate.exp() - torch.lgamma(k + 1)


def negative_binomial_log_pmf(log_mean: Tensor, log_dispersion: Tensor, K: int) -> Tensor:
    """(K, C) log P(d), d = 1 … K, of a negative binomial shifted to start at 1.

    d − 1 has mean μ = exp(log_mean) and variance μ + μ²/r with dispersion
    r = exp(log_dispersion); r → ∞ is the Poisson, r = 1 the geometric. Mass
    beyond K is dropped.

    Args:
        log_mean: (C,) log μ per label.
        log_dispersion: (C,) log r per label.
        K: the longest duration.

    Returns:
        (K, C) tensor: row d − 1 is log P(d) per label, differentiable with
        respect to the parameters.
    """
    k = torch.arange(K, dtype=log_mean.dtype, device=log_mean.device)[:, None]
    r = log_dispersion.exp()
    log_total = torch.logaddexp(log_mean, log_dispersion)  # log(μ + r)
    return (torch.lgamma(k + r) - torch.lgamma(r) - torch.lgamma(k + 1)
            + r * (log_dispersion - log_total) + k * (log_mean - log_total))


def soft_uniform_log_pmf(low: Tensor, high: Tensor, K: int, softness: float) -> Tensor:
    """(K, C) log P(d), d = 1 … K, of a uniform over [low, high] with soft edges.

    P(d) ∝ sigmoid((d − low + ½) / s) · sigmoid((high + ½ − d) / s), normalised
    over d = 1 … K (so it sums to exactly 1). As s → 0 it is the uniform on
    the integers of [low, high]; a soft edge lets the bounds learn.

    Args:
        low: (C,) lower bound per label, in positions.
        high: (C,) upper bound per label (≥ low).
        K: the longest duration.
        softness: s > 0, the width of the edges in positions.

    Returns:
        (K, C) tensor: row d − 1 is log P(d) per label, differentiable with
        respect to the parameters.
    """
    d = torch.arange(1, K + 1, dtype=low.dtype, device=low.device)[:, None]
    w = F.logsigmoid((d - low + 0.5) / softness) + F.logsigmoid((high + 0.5 - d) / softness)
    return w - torch.logsumexp(w, dim=0, keepdim=True)


__all__ = [
    "geometric_log_pmf",
    "negative_binomial_log_pmf",
    "poisson_log_pmf",
    "soft_uniform_log_pmf",
]
