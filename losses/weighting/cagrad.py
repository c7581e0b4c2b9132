"""``cagrad``: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu 2021,
"Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS, eq. 2-3 and Algorithm 1).

With g_0 = (1/k) sum_i g_i the average gradient, CAGrad looks for the update d that maximises
the worst task's improvement min_i <g_i, d> within a ball around g_0:

    max_d min_i <g_i, d>   subject to   || d - g_0 || <= c || g_0 ||                      (eq. 2)

Its dual is a problem over the simplex, with g_w = sum_i w_i g_i and phi = c^2 ||g_0||^2:

    w* = argmin_{w in simplex}  <g_w, g_0> + sqrt(phi) || g_w ||                          (eq. 3)
    d  = g_0 + sqrt(phi) / || g_w* || * g_w*

Both terms only need the Gramian: <g_w, g_0> = w^T G 1/k, ||g_w||^2 = w^T G w. We solve eq. 3 with
scipy's SLSQP (as the authors' code does; here with the analytic gradient and a tight tolerance)
on G / trace(G): w* and the ratio sqrt(phi) / ||g_w*|| are unchanged by scaling G. ``rescale``
is the authors' final division (their code and LibMTL: 0: d, 1: d / (1 + c^2), 2: d / (1 + c)).

As in the authors' code, the shared parameters get d and every private parameter (task heads)
the plain sum of its task gradients (reported weights 1): they back-propagate each task loss and
overwrite the shared gradients with d.

Our choices where the paper is silent: when the optimal g_w* is zero (0 lies in the convex hull
of the gradients: a Pareto-stationary point) the ratio sqrt(phi)/||g_w*|| is undefined; we take
d = g_0 there (the authors' code divides by ||g_w*|| + 1e-8; torchjd returns 0). Stateless.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, GradientWeighting, TaskGradients
from polytask.losses.weighting.solvers import combination

RESCALES = (0, 1, 2)


def cagrad_dual_weights(gramian: np.ndarray, c: float) -> np.ndarray:
    """w* of eq. 3 for a ``(k, k)`` Gramian (already scaled to trace 1), by SLSQP."""
    from scipy.optimize import minimize

    k = gramian.shape[0]
    mean = np.full(k, 1.0 / k)
    g_mean = gramian @ mean                    # <g_i, g_0>
    radius = c * np.sqrt(max(mean @ g_mean, 0.0))

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        g_w = gramian @ w
        norm = np.sqrt(max(w @ g_w, 1e-30))    # the floor keeps the gradient finite at g_w = 0
        return float(w @ g_mean + radius * norm), g_mean + radius * g_w / norm

    result = minimize(objective, mean, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * k,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                    "jac": lambda w: np.ones_like(w)}],
                      options={"ftol": 1e-15, "maxiter": 1000})
    w = np.clip(result.x, 0.0, None)
    return w / w.sum()


@register_weighting("cagrad")
class CAGrad(GradientWeighting):
    """Args:
        task_names: every task of the run.
        c: radius of the ball around g_0, relative to ||g_0|| (``calpha``; 0 gives g_0).
        rescale: 0, 1 or 2: divide d by 1, 1 + c^2 or 1 + c (the authors' default 1).
        gradient_reducer: applied to the ``(k, P)`` per-task gradients before the solve (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], c: float = 0.5, rescale: int = 1, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if not c >= 0:
            raise ValueError(f"cagrad c must be >= 0, got {c!r}")
        if rescale not in RESCALES:
            raise ValueError(f"cagrad rescale must be 0, 1 or 2, got {rescale!r}")
        self.c, self.rescale = float(c), int(rescale)

    def coefficients(self, gramian: Tensor, losses: Tensor, names: list[str]) -> Tensor:
        """``(k,)`` c with d = sum_i c_i g_i: (1/k + sqrt(phi)/||g_w*|| w*_i) / rescale."""
        k = gramian.shape[0]
        g = gramian.detach().to("cpu", torch.float64).numpy()
        g = (g + g.T) / 2
        trace = float(np.trace(g))
        coefs = np.full(k, 1.0 / k)
        if trace > 0 and self.c > 0:
            g = g / trace
            w = cagrad_dual_weights(g, self.c)
            radius = self.c * np.sqrt(max(coefs @ g @ coefs, 0.0))
            norm_w = np.sqrt(max(w @ g @ w, 0.0))
            if norm_w > 1e-10:  # relative to ||J||_F; else Pareto-stationary: d = g_0 (docstring)
                coefs = coefs + radius / norm_w * w
        coefs = coefs / (1.0, 1.0 + self.c ** 2, 1.0 + self.c)[self.rescale]
        return torch.as_tensor(coefs, dtype=torch.float64).to(gramian.device)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        c = self.coefficients(grads.gramian(), grads.losses, grads.names)
        return combination(c, grads.matrix), torch.ones_like(c)
