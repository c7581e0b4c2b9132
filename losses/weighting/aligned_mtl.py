"""``aligned_mtl``: Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin 2023, "Independent
Component Alignment for Multi-Task Learning", CVPR, Sec. 4 and Algorithm 1).

The task gradients J (``(k, P)``) are replaced by the closest matrix (Procrustes) whose rows are
orthogonal and of equal norm, so the system of gradients has condition number 1 (no dominating
or conflicting task). With the eigen-decomposition of the Gramian G = J J^T = V Lambda V^T
(Algorithm 1, rank r: eigenvalues below k * eps * lambda_max are dropped):

    B = sqrt(lambda_r) V Lambda^{-1/2} V^T,      update = (B w)^T J    (= w^T J^ aligned)

with sqrt(lambda_r) the scale (the smallest kept eigenvalue, the paper's choice; ``scale_mode``
``median`` and ``rmse`` (mean) are torchjd's variants) and w the task preferences, ones here as
in the authors' code and LibMTL (``B.sum(0)``). torchjd's ``AlignedMTL`` uses w = 1/k: its
update is ours divided by k. Private parameters get the plain sum (weights 1), as in LibMTL.

Our choices where the paper is silent: when every gradient is zero (rank 0) the update is 0.
Stateless.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, GradientWeighting, TaskGradients
from polytask.losses.weighting.solvers import combination

SCALE_MODES = ("min", "median", "rmse")


def balance_transformation(gramian: Tensor, scale_mode: str = "min") -> Tensor:
    """``(k, k)`` B = sqrt(scale) V_r Lambda_r^{-1/2} V_r^T of Algorithm 1 (zeros at rank 0)."""
    eigenvalues, vectors = torch.linalg.eigh(gramian)
    top = eigenvalues.max()
    kept = eigenvalues > top * gramian.shape[0] * torch.finfo(gramian.dtype).eps
    if not bool(kept.any()) or not top > 0:
        return torch.zeros_like(gramian)
    lam, v = eigenvalues[kept], vectors[:, kept]
    scale = {"min": lam.min(), "median": lam.median(), "rmse": lam.mean()}[scale_mode]
    return scale.sqrt() * (v / lam.sqrt()) @ v.T


@register_weighting("aligned_mtl")
class AlignedMTL(GradientWeighting):
    """Args:
        task_names: every task of the run.
        scale_mode: ``min`` (the paper), ``median`` or ``rmse`` (the mean eigenvalue).
        gradient_reducer: applied to the ``(k, P)`` per-task gradients first (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], scale_mode: str = "min", *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"aligned_mtl scale_mode must be one of {', '.join(SCALE_MODES)}; "
                             f"got {scale_mode!r}")
        self.scale_mode = scale_mode

    def coefficients(self, gramian: Tensor, losses: Tensor, names: list[str]) -> Tensor:
        return balance_transformation(gramian, self.scale_mode).sum(dim=1)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        c = self.coefficients(grads.gramian(), grads.losses, grads.names)
        return combination(c, grads.matrix), torch.ones_like(c)
