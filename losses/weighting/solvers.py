"""The small optimisation problems behind the Gramian-based weightings, each solved by a
well-kept library routine rather than a hand-written iteration.

Every problem here depends on the per-task gradients only through their Gramian
``G = J J^T`` (``(k, k)``, float64). Writing ``G = A^T A`` with a ``(k, k)`` square root ``A``
(:func:`gramian_root`) turns the two quadratic programs into non-negative least squares, which
scipy solves exactly (Lawson & Hanson's active-set NNLS, finite termination):

* **min-norm point of the convex hull** (MGDA): ``min_{c in simplex} c^T G c``. For any c in the
  simplex and s > 0, ``|| A (s c) ||^2 + (1 - s)^2 = s^2 c^T G c + (1 - s)^2``, so the NNLS
  problem ``min_{v >= 0} || [A; 1^T] v - [0; 1] ||^2`` is solved by ``v = s* c*`` with ``c*`` the
  min-norm coefficients and ``s* = 1 / (1 + c*^T G c*) > 0``: ``c* = v / sum(v)``.
* **projection onto the dual cone** (UPGrad, Quinton & Rey 2024, Prop. 1): the weights of the
  projection of ``J^T u`` onto ``{x : J x >= 0}`` are ``argmin_{v >= u} v^T G v``; with
  ``v = u + z``: ``min_{z >= 0} || A z + A u ||^2``.

Both answers are invariant to scaling G, so G is divided by its trace first (entries O(1)).
scipy is imported on first use, so that importing polytask stays fast.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_numpy(gramian: Tensor) -> np.ndarray:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"a Gramian must be a non-empty square (k, k) matrix, got shape "
                         f"{tuple(gramian.shape)}")
    g = gramian.detach().to("cpu", torch.float64).numpy()
    return (g + g.T) / 2  # exactly symmetric, whatever rounding the product left


def _normalized(g: np.ndarray) -> np.ndarray | None:
    """``G / trace(G)``, or None when every gradient is zero (the trace vanishes)."""
    trace = float(np.trace(g))
    return g / trace if trace > 0 and np.isfinite(trace) else None


def gramian_root(gramian: Tensor | np.ndarray) -> np.ndarray:
    """A ``(k, k)`` matrix ``A`` with ``A^T A = G`` (from ``eigh``; the tiny negative eigenvalues
    that rounding leaves in a singular Gramian are clipped to 0)."""
    g = _as_numpy(gramian) if isinstance(gramian, Tensor) else gramian
    eigenvalues, vectors = np.linalg.eigh(g)
    return np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * vectors.T


def _back(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64).to(like.device)


def min_norm_coefficients(gramian: Tensor) -> Tensor:
    """``argmin_{c >= 0, sum c = 1} c^T G c``: the coefficients of the min-norm point of the convex
    hull of the task gradients, ``(k,)`` float64 (MGDA, Sener & Koltun 2018, eq. 3). When several
    c give the same (zero) point, NNLS returns one of them; all-zero gradients give ``1/k``."""
    from scipy.optimize import nnls

    g = _normalized(_as_numpy(gramian))
    k = gramian.shape[0]
    if g is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gramian.device)
    system = np.vstack([gramian_root(g), np.ones((1, k))])
    target = np.zeros(k + 1)
    target[-1] = 1.0
    v, _ = nnls(system, target)
    return _back(v / v.sum(), gramian)


def dual_cone_weights(gramian: Tensor, u: Tensor) -> Tensor:
    """``argmin_{v >= u} v^T G v``, ``(k,)`` float64: ``J^T v`` is the projection of ``J^T u`` onto
    the dual cone of the rows of J, the set of directions that conflict with no task
    (Quinton & Rey 2024, Prop. 1). All-zero gradients give ``u`` itself."""
    from scipy.optimize import nnls

    g = _normalized(_as_numpy(gramian))
    u_np = u.detach().to("cpu", torch.float64).numpy()
    if g is None:
        return _back(u_np, gramian)
    root = gramian_root(g)
    z, _ = nnls(root, -root @ u_np)
    return _back(u_np + z, gramian)


def combination(coefficients: Tensor, matrix: Tensor) -> Tensor:
    """``sum_i c_i g_i`` for ``(k,)`` coefficients and ``(k, P)`` gradients, in the gradients'
    dtype and device."""
    return coefficients.to(matrix) @ matrix
