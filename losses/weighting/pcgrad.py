"""``pcgrad``: projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman & Finn 2020,
"Gradient Surgery for Multi-Task Learning", NeurIPS, Algorithm 1).

For each task i, start from g_i^PC = g_i (its gradient on the shared parameters) and visit the
other tasks j in random order; whenever g_i^PC . g_j < 0 (conflict), remove the conflicting
component:

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

The shared parameters receive sum_i g_i^PC; every other parameter (task heads, private
layers) the plain sum of task gradients (weights 1); ``extra`` terms are added unprojected
everywhere (:class:`~polytask.losses.weighting.base.GradientWeighting`).
The random order comes from a ``torch.Generator`` seeded by ``seed``; its state is part of
the module's ``state_dict`` (extra state) so a resumed run continues the same sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import (GradientReducer, GradientWeighting, Seeded,
                                            TaskGradients)


def project_conflicting(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's surgery on stacked task gradients ``(k, P)`` -> combined update ``(P,)``."""
    k = grads.shape[0]
    projected = grads.clone()
    for i in range(k):
        others = [j for j in torch.randperm(k, generator=generator).tolist() if j != i]
        for j in others:
            dot = projected[i] @ grads[j]
            if dot < 0:  # conflict: drop the component of g_i^PC along g_j
                projected[i] = projected[i] - dot / grads[j].pow(2).sum() * grads[j]
    return projected.sum(dim=0)


def pcgrad_coefficients(gramian: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The same surgery on the ``(k, k)`` Gramian ``G = g g^T`` alone: ``(k,)`` coefficients c
    with ``c @ g == project_conflicting(g)`` (same random order for the same generator state).

    Every projected g_i^PC stays a combination ``sum_j C_ij g_j`` of the original gradients, and
    everything the projection tests and subtracts is an inner product: ``<g_i^PC, g_j> =
    (C G)_ij`` and ``||g_j||^2 = G_jj``. So PCGrad needs k^2 numbers instead of a k x P copy of
    the gradients, and runs unchanged on sharded parameters (the Gramian sums over shards)."""
    k = gramian.shape[0]
    C = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
    for i in range(k):
        others = [j for j in torch.randperm(k, generator=generator).tolist() if j != i]
        for j in others:
            dot = C[i] @ gramian[:, j]
            if dot < 0:
                C[i, j] -= dot / gramian[j, j]
    return C.sum(dim=0)


@register_weighting("pcgrad")
class PCGrad(Seeded, GradientWeighting):
    """Args:
        task_names: every task of the run.
        seed: seed of the generator that orders the projections.
        gradient_reducer: applied to the ``(k, P)`` per-task gradients on the shared parameters
            before the projections (see :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], seed: int = 0, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        self.seed_generator(seed)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        """The projected sum on the shared parameters; weight 1 for every task elsewhere."""
        weights = torch.ones(len(grads.names), dtype=torch.float64, device=grads.matrix.device)
        # on the Gramian (k^2 numbers, no copy of the (k, P) gradients); equal to
        # project_conflicting(grads.matrix, self.generator) up to rounding
        c = pcgrad_coefficients(grads.gramian(), self.generator)
        return c.to(grads.matrix) @ grads.matrix, weights
