"""``upgrad``: Unconflicting Projection of Gradients (Quinton & Rey 2024, "Jacobian Descent for
Multi-Objective Optimization", arXiv:2406.16232, Sec. 3, eq. 3-4 and Prop. 1).

Each task gradient is projected onto the dual cone of all of them, the set of directions that
decrease no task's loss less than zero (``{x : <g_j, x> >= 0 for all j}``), and the projections
are averaged:

    update = (1/k) sum_i pi_J(g_i),      pi_J(g_i) = argmin_{x in dual cone} || x - g_i ||   (eq. 3)

so ``<update, g_j> >= 0`` for every task j: the update never conflicts with any task. By
Prop. 1, pi_J(J^T u) = J^T v with v = argmin_{v >= u} v^T G v, a quadratic program on the
Gramian alone, solved exactly here as non-negative least squares
(:func:`polytask.losses.weighting.solvers.dual_cone_weights`; torchjd uses quadprog on G
normalised by its trace plus 1e-4 I, which shifts its results in the 4th digit).

As in torchjd's ``mtl_backward``, the shared parameters get the update and every private
parameter (task heads) the gradient of its own task's loss (weights 1). Stateless.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, GradientWeighting, TaskGradients
from polytask.losses.weighting.solvers import combination, dual_cone_weights


@register_weighting("upgrad")
class UPGrad(GradientWeighting):
    """Args:
        task_names: every task of the run.
        gradient_reducer: applied to the ``(k, P)`` per-task gradients first (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)

    def coefficients(self, gramian: Tensor, losses: Tensor, names: list[str]) -> Tensor:
        """``(k,)`` c = (1/k) sum_i v_i, v_i the projection weights of g_i (u = e_i)."""
        eye = torch.eye(gramian.shape[0], dtype=torch.float64, device=gramian.device)
        return torch.stack([dual_cone_weights(gramian, e) for e in eye]).mean(dim=0)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        c = self.coefficients(grads.gramian(), grads.losses, grads.names)
        return combination(c, grads.matrix), torch.ones_like(c)
