"""Anchoring penalties for continual learning: L2 to earlier weights and EWC.

Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks", eq. 3) keeps each parameter near the value it had after an earlier task,
in proportion to how much that task's log-likelihood depends on it:

    penalty = lambda / 2 * sum_a sum_i F^a_i (theta_i - theta^a_i)^2

summed over the anchors ``a`` (one per earlier stage: the paper's multiple-penalty form, not
the online form of Schwarz et al. 2018, so each stage's Fisher stays as measured). ``F^a`` is
the diagonal Fisher information at ``theta^a``; L2 anchoring is the same with ``F = 1``.

The Fisher here is the *empirical* Fisher: the mean over N training examples of the squared
gradient of each example's log-likelihood of its observed target (per-example gradients, one
backward per example), not the expectation under the model's own samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn


@dataclass
class Anchor:
    """One earlier stage's weights ``theta`` (name -> tensor) and, for EWC, its diagonal
    Fisher (same names and shapes; ``None``: L2, every F_i = 1)."""

    theta: dict[str, Tensor]
    fisher: dict[str, Tensor] | None = None


def anchor_penalty(params: dict[str, Tensor], anchors: Iterable[Anchor],
                   weight: float) -> Tensor | None:
    """``weight / 2 * sum_a sum_i F^a_i (params_i - theta^a_i)^2`` over the parameters named
    in both ``params`` and an anchor (a tensor the model no longer has, or one not trained,
    is left out by the caller's choice of ``params``). ``None`` when nothing is anchored, so
    the training loop adds no term."""
    terms: list[Tensor] = []
    for anchor in anchors:
        for name, theta in anchor.theta.items():
            p = params.get(name)
            if p is None:
                continue
            if p.shape != theta.shape:
                raise ValueError(f"anchor tensor {name} has shape {tuple(theta.shape)}, the "
                                 f"model's {tuple(p.shape)}: the anchor is of another model")
            diff = (p - theta.to(device=p.device, dtype=p.dtype)).square()
            if anchor.fisher is not None:
                diff = diff * anchor.fisher[name].to(device=p.device, dtype=p.dtype)
            terms.append(diff.sum())
    if not terms:
        return None
    return weight / 2 * torch.stack(terms).sum()


def diagonal_fisher(params: dict[str, nn.Parameter],
                    log_likelihoods: Iterable[Callable[[], Tensor]]) -> dict[str, Tensor]:
    """The empirical diagonal Fisher ``F_i = mean_n (d log p(y_n | x_n) / d theta_i)^2``.

    Args:
        params: name -> parameter (those to anchor; each must require grad).
        log_likelihoods: one callable per example returning that example's scalar
            log-likelihood (a fresh forward pass each, so each gradient is per-example).

    Returns:
        name -> tensor of the parameter's shape (float32 on the parameter's device); a
        parameter the examples do not reach has F = 0.
    """
    names = list(params)
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    count = 0
    for log_likelihood in log_likelihoods:
        value = log_likelihood()
        grads = torch.autograd.grad(value, [params[n] for n in names], allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                fisher[name] += g.detach().float().square()
        count += 1
    if count == 0:
        raise ValueError("diagonal_fisher needs at least one example (continual.fisher_examples)")
    return {n: f / count for n, f in fisher.items()}
