"""``nash_mtl``: Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya & Shamir
2022, "Multi-Task Learning as a Bargaining Game", ICML, Sec. 3 and Algorithm 1).

The update is the Nash bargaining solution among the tasks, d = sum_i alpha_i g_i, where
alpha > 0 solves (Theorem 3.1)

    G alpha = 1 / alpha          (elementwise: alpha_i (G alpha)_i = 1)

with G the Gramian of the task gradients on the shared parameters. It is the unique minimiser of
the strictly convex F(alpha) = 1/2 alpha^T G alpha - sum_i log alpha_i, which exists iff no convex
combination of the gradients is zero (otherwise F is unbounded below: a Pareto-stationary point,
where no direction improves every task).

Solver: the paper linearises the concave term and solves a sequence of convex problems with
cvxpy (their ``optim_niter`` rounds). We minimise F in u = log(alpha) (unconstrained; its only
stationary point is the solution) with scipy's exact-Hessian trust region, then polish the
residual alpha * (G alpha) - 1 to machine precision with scipy's Levenberg-Marquardt; all on
G / ||G||_F (as their code, for conditioning: alpha for G is alpha' / sqrt(||G||_F)). A solve is
accepted when max_i |alpha_i (G alpha)_i - 1| < 1e-8. Each solve starts afresh (from the
solution for orthogonal gradients): their sequence, warm-started from the previous alpha, can
stall there and return the stale alpha when the solution has moved far (seen in torchjd's copy
of their code; see the tests).

As in the authors' code: the network is trained on ``sum_i alpha_i L_i`` (private parameters get
``alpha_i grad L_i``; the reported weights are alpha), the shared gradient is then clipped to norm
``max_norm`` (0: no clipping; their ``clip_grad_norm_`` on the shared parameters only), alpha is
recomputed every ``update_weights_every`` steps and reused in between, and when no solution
exists the previous alpha is kept (ones before the first solve).

Our choices where the paper is silent: the step count and alpha (per task, indexed by
``self.index``; NaN until first solved) are buffers, so a resumed run continues identically; on a
step that reuses alpha but has a present task never solved for, alpha is solved afresh; the clip
scales by max_norm / ||d|| exactly (their ``clip_grad_norm_`` adds 1e-6 to the norm).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, GradientWeighting, TaskGradients
from polytask.losses.weighting.solvers import combination

TOLERANCE = 1e-8


def bargaining_solution(gramian: Tensor) -> Tensor | None:
    """alpha > 0 with ``alpha * (G @ alpha) = 1``, ``(k,)`` float64; None when none exists (a task
    gradient is zero, or 0 is in the convex hull of the gradients) or the solve fails."""
    from scipy.optimize import least_squares, minimize

    g = gramian.detach().to("cpu", torch.float64).numpy()
    g = (g + g.T) / 2
    scale = float(np.linalg.norm(g))
    if not np.isfinite(scale) or np.any(np.diag(g) <= 0):
        return None
    g = g / scale

    def residual(u: np.ndarray) -> np.ndarray:
        a = np.exp(u)
        return a * (g @ a) - 1.0

    def jacobian(u: np.ndarray) -> np.ndarray:       # also the Hessian of F(e^u)
        a = np.exp(u)
        return np.diag(a * (g @ a)) + np.outer(a, a) * g

    def objective(u: np.ndarray) -> float:
        a = np.exp(u)
        return 0.5 * a @ (g @ a) - u.sum()

    u = -0.5 * np.log(np.diag(g))                     # the solution when gradients are orthogonal
    with np.errstate(all="ignore"):
        try:
            u = minimize(objective, u, jac=residual, hess=jacobian, method="trust-exact",
                         options={"gtol": 1e-10, "maxiter": 200}).x
            u = least_squares(residual, u, jac=jacobian, method="lm",
                              xtol=1e-15, ftol=1e-15, gtol=1e-15).x
        except (ValueError, ArithmeticError, UnboundLocalError, np.linalg.LinAlgError):
            return None   # scipy's trust region can raise on an unbounded (degenerate) problem
        if not np.all(np.isfinite(u)) or np.abs(residual(u)).max() >= TOLERANCE:
            return None
    return torch.as_tensor(np.exp(u) / np.sqrt(scale), dtype=torch.float64).to(gramian.device)


@register_weighting("nash_mtl")
class NashMTL(GradientWeighting):
    """Args:
        task_names: every task of the run.
        max_norm: clip the shared update to this norm (0: no clipping; the authors' 1.0).
        update_weights_every: solve for alpha every this many steps, reuse it in between.
        gradient_reducer: applied to the ``(k, P)`` per-task gradients before the solve (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], max_norm: float = 1.0,
                 update_weights_every: int = 1, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if not max_norm >= 0:
            raise ValueError(f"nash_mtl max_norm must be >= 0 (0: no clipping), got {max_norm!r}")
        if isinstance(update_weights_every, bool) or not isinstance(update_weights_every, int) \
                or update_weights_every < 1:
            raise ValueError(f"nash_mtl update_weights_every must be an integer >= 1, got "
                             f"{update_weights_every!r}")
        self.max_norm, self.update_weights_every = float(max_norm), update_weights_every
        self.register_buffer("alpha", torch.full((self.n_tasks,), float("nan"),
                                                 dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def coefficients(self, gramian: Tensor, losses: Tensor, names: list[str]) -> Tensor:
        idx = torch.tensor([self.index[n] for n in names], device=self.alpha.device)
        stored = self.alpha[idx]
        due = int(self.steps) % self.update_weights_every == 0
        self.steps = self.steps + 1
        if not due and not bool(stored.isnan().any()):
            return stored.to(gramian.device)
        alpha = bargaining_solution(gramian)
        if alpha is None:   # no bargaining solution: keep the previous alpha (ones at first)
            alpha = torch.where(stored.isnan(), torch.ones_like(stored), stored)
        new = self.alpha.clone()
        new[idx] = alpha.to(new)
        self.alpha = new
        return alpha.to(gramian.device)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        alpha = self.coefficients(grads.gramian(), grads.losses, grads.names)
        update = combination(alpha, grads.matrix)
        norm = update.norm()
        if self.max_norm > 0 and norm > self.max_norm:
            update = update * (self.max_norm / norm)
        return update, alpha
