"""``mgda``: the multiple-gradient descent algorithm as multi-task learning (Sener & Koltun 2018,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS, eq. 3 and Algorithm 2).

The update is the min-norm point of the convex hull of the task gradients on the shared
parameters:

    c* = argmin_{c >= 0, sum_i c_i = 1} || sum_i c_i g_i ||^2,    update = sum_i c*_i g_i   (eq. 3)

It is zero exactly at a Pareto-stationary point; otherwise it decreases every task's loss. The
paper solves eq. 3 by Frank-Wolfe (Algorithm 2, with a closed form for two tasks); we solve the
same quadratic program exactly as non-negative least squares
(:func:`polytask.losses.weighting.solvers.min_norm_coefficients`), so the result does not
depend on an iteration count or stopping tolerance.

``normalization`` is the authors' ``gradient_normalizers`` (their code, ``min_norm_solvers.py``;
"optional and not included in the paper"): before solving, g_i is divided by
``none``: 1, ``l2``: ||g_i||, ``loss``: L_i, ``loss+``: L_i ||g_i||. As in their
``train_multi_task.py``, the solution c* then scales the *raw* losses: the network is trained on
``sum_i c*_i L_i``, so the shared parameters get ``sum_i c*_i g_i`` and every private parameter
(task heads) ``c*_i grad L_i``; the reported weights are c*. (LibMTL's ``MGDA`` instead applies
c* to the normalised gradients of the shared parameters and gives the heads weight 1.)

MGDA-UB, the paper's upper-bound approximation (Sec. 3.3), takes the gradients w.r.t. the
shared *representation* Z (the encoder output of the batch, one backward through the heads
only) instead of the shared parameters: ``mgda_ub`` (:class:`MGDAUpperBound`), labelled as the
approximation it is; :meth:`MGDA.representation_weights` computes its weights.

Our choices where the paper is silent: a task whose gradient is zero under ``l2``/``loss+`` (or
whose loss is 0 under ``loss``/``loss+``) keeps normaliser 1 rather than dividing by zero; with
all gradients zero every c_i = 1/k. Stateless.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import (GradientReducer, GradientWeighting, TaskGradients,
                                            run_backward, task_gradients, weighted_sum)
from polytask.losses.weighting.solvers import min_norm_coefficients

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register_weighting("mgda")
class MGDA(GradientWeighting):
    """Args:
        task_names: every task of the run.
        normalization: ``none`` (the paper), ``l2``, ``loss`` or ``loss+`` (the authors' code's
            ``gradient_normalizers``; see the module docstring).
        gradient_reducer: applied to the ``(k, P)`` per-task gradients before the solve (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], normalization: str = "none", *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"mgda normalization must be one of {', '.join(NORMALIZATIONS)}; "
                             f"got {normalization!r}")
        self.normalization = normalization

    def normalizers(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """``(k,)`` n_i that divide g_i before the solve (the authors' ``gradient_normalizers``)."""
        norms = gramian.diagonal().clamp_min(0).sqrt()
        losses = losses.to(gramian)
        n = {"none": torch.ones_like(norms), "l2": norms, "loss": losses,
             "loss+": losses * norms}[self.normalization]
        return torch.where(n > 0, n, torch.ones_like(n))

    def coefficients(self, gramian: Tensor, losses: Tensor, names: list[str]) -> Tensor:
        n = self.normalizers(gramian, losses)
        # Gramian of the normalised gradients g_i / n_i; c* multiplies the raw ones.
        return min_norm_coefficients(gramian / (n[:, None] * n[None, :]))

    def representation_weights(self, losses: dict[str, Tensor],
                               representation: Tensor) -> dict[str, float]:
        """MGDA-UB (Sec. 3.3): the weights from the gradients of the task losses w.r.t. the shared
        representation Z (any tensor in the graph between the shared encoder and the heads;
        flattened whole, as the authors' code takes ``rep_variable.grad``). The caller then
        backpropagates ``sum_i w_i L_i`` (the graph is kept). ``gradient_reducer`` is not applied:
        rows of Z are per-example, so under data parallelism the per-rank Gramians must be
        summed instead (the Gramian of the concatenated batch is their sum)."""
        present = self.present(losses)
        if not present:
            return {}
        grads = task_gradients({n: losses[n] for n in present}, [representation])
        matrix = torch.stack([grads[n] for n in present])
        detached = torch.stack([losses[n].detach().double() for n in present])
        c = self.coefficients(TaskGradients(present, matrix, [representation], detached).gramian(),
                              detached, present)
        return {n: float(w) for n, w in zip(present, c)}


@register_weighting("mgda_ub")
class MGDAUpperBound(MGDA):
    """MGDA-UB (Sec. 3.3), an **approximation** of ``mgda``: the min-norm solve on the gradients
    of the task losses w.r.t. the shared representation Z (the encoder output, after the last
    encoder layer all tasks share: ``MultiTaskOutput.shared``) instead of the shared parameters.
    The paper's premise is a batch whose every example is labelled for every task. In polytask's
    mixed batches each row belongs to one task, so dL_i/dZ is zero outside task i's rows, the
    Gramian is diagonal, and the min-norm weights reduce to ``c_i ∝ 1 / ||dL_i/dZ||^2`` (an
    inverse squared-gradient-norm weighting): cheap, but not the exact ``mgda`` update, which
    the one-pass per-task gradients make affordable. The network trains on ``sum_i c_i L_i``.

    The training loop passes Z (``representation=``) to :meth:`backward`; a plan without an
    encoder shared by every task has no Z and is refused. One process only (per-rank Gramians
    would have to be summed, which the gradient reducer, an average, does not do).

    Args: as :class:`MGDA`.
    """

    uses_representation = True

    def __init__(self, task_names: Sequence[str], normalization: str = "none", *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        if gradient_reducer is not None:
            raise ValueError("weighting mgda_ub runs in one process only (under torchrun the "
                             "ranks' representation Gramians would have to be summed); use mgda")
        super().__init__(task_names, normalization)

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[torch.nn.Parameter], *,
                 extra: Tensor | None = None,
                 last_shared: Sequence[torch.nn.Parameter] | None = None,
                 representation: Tensor | None = None) -> dict[str, float]:
        if representation is None:
            raise ValueError("weighting mgda_ub needs the encoder output shared by every task "
                             "(MultiTaskOutput.shared); this sharing plan has none: use mgda")
        weights = self.representation_weights(losses, representation)
        run_backward(weighted_sum({n: losses[n] for n in weights}, weights) if weights else None,
                     extra)
        return weights
