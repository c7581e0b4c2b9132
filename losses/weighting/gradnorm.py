"""``gradnorm``: GradNorm (Chen, Badrinarayanan, Lee & Rabinovich 2018, "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML, Sec. 3.2, Alg. 1).

With W the last shared layer's parameters and task weights w_i:

    G_i      = || grad_W (w_i L_i) ||_2 = w_i || grad_W L_i ||_2,   G_bar = mean_i G_i
    L~_i     = L_i(t) / L_i(0),   r_i = L~_i / mean_j L~_j          (relative inverse rate)
    L_grad   = sum_i | G_i - G_bar * r_i^alpha |                     (eq. 2)

The target G_bar * r_i^alpha is a constant; L_grad is differentiated w.r.t. the w_i only. Per
Algorithm 1 the network gets the gradient of sum_i w_i(t) L_i with the *current* weights, then
w takes one plain gradient step w <- w - lr * grad_w L_grad and is renormalised so that
sum_i w_i = K (the task count).

Our choices where the paper is silent: L_i(0) is the first loss observed for task i (a task
may first appear after step 0 in a mixed batch); at a step, G_bar and r use only the tasks
present; weights are floored at ``min_weight`` before renormalising so none can turn
negative. The weights are a buffer with this update rule, not an ``nn.Parameter``.

As a :class:`~polytask.losses.weighting.base.GradientWeighting`, the update on the shared
parameters is the weighted sum itself (``w @ matrix``) and the weights w(t) apply everywhere;
only the norms on W (``TaskGradients.columns``) steer w.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import (GradientReducer, GradientWeighting, TaskGradients,
                                            run_backward, task_gradients, weighted_sum)


@register_weighting("gradnorm")
class GradNorm(GradientWeighting):
    """Args:
        task_names: every task of the run (K = their number).
        alpha: restoring-force strength (0: equal gradient norms; paper uses 0.12 - 3).
        lr: learning rate of the weights' gradient step.
        min_weight: floor applied before renormalisation (see module docstring).
        gradient_reducer: applied to the ``(k, P)`` per-task gradients (on W in ``backward``)
            before their norms are taken (see :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], alpha: float = 1.5, lr: float = 0.025,
                 min_weight: float = 1e-6, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if alpha < 0 or lr <= 0 or min_weight < 0:
            raise ValueError(f"need alpha >= 0, lr > 0, min_weight >= 0; got alpha={alpha}, "
                             f"lr={lr}, min_weight={min_weight}")
        self.alpha, self.lr, self.min_weight = float(alpha), float(lr), float(min_weight)
        self.register_buffer("task_weights", torch.ones(self.n_tasks, dtype=torch.float64))
        self.register_buffer("initial_losses", torch.full((self.n_tasks,), math.nan,
                                                          dtype=torch.float64))

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        """The weighted sum with the current weights w(t) (``update = w @ matrix``); w(t+1) is
        computed from the gradient norms on W, ``grads.last_shared`` (default ``params[-1:]``)."""
        w_grads = grads.columns(grads.last_shared or grads.params[-1:])
        w_now = self.step_weights(grads.names, w_grads, grads.losses)
        return w_now.to(grads.matrix) @ grads.matrix, w_now

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], *,
                 extra: Tensor | None = None,
                 last_shared: Sequence[nn.Parameter] | None = None) -> dict[str, float]:
        """The reference path, specialised: GradNorm's update is the plain weighted sum, so only
        the gradients on W are taken (k x P_W, not k x P_shared) and one backward does the rest.
        Same result as :meth:`GradientWeighting.backward`."""
        present = self.present(losses)
        if not present:
            run_backward(None, extra)
            return {}
        losses = {n: losses[n] for n in present}
        w_params = list(last_shared or [shared_params[-1]])
        grads = task_gradients(losses, w_params, reduce=self.gradient_reducer)  # name -> (P_W,)
        detached = torch.stack([losses[n].detach().double() for n in present])
        w_now = self.step_weights(present, torch.stack([grads[n] for n in present]), detached)
        used = {n: float(w) for n, w in zip(present, w_now)}
        # Algorithm 1: the network step uses w(t); w(t+1) was computed alongside.
        run_backward(weighted_sum(losses, used), extra)
        return used

    def step_weights(self, names: list[str], w_grads: Tensor, losses: Tensor) -> Tensor:
        """Returns w(t) of the tasks ``names`` (``(k,)``) and sets w(t+1), given their gradients
        on W ``(k, P_W)`` and their losses ``(k,)``; records L_i(0)."""
        idx = torch.tensor([self.index[n] for n in names])
        w_now = self.task_weights[idx].clone()
        grad_w = self.weight_gradient(idx, w_grads, losses)
        new = self.task_weights.clone()
        new[idx] = (w_now - self.lr * grad_w).clamp_min(self.min_weight)
        self.task_weights = new * (self.n_tasks / new.sum())
        return w_now

    def weight_gradient(self, idx: Tensor, w_grads: Tensor, losses: Tensor) -> Tensor:
        """grad_w L_grad for the tasks ``idx`` (run order), ``(k,)``; records L_i(0)."""
        # weighting state lives in float64 buffers (device of the module), whatever the losses'
        current = losses.detach().to(self.initial_losses)
        first = torch.isnan(self.initial_losses[idx])
        if bool(first.any()):
            init = self.initial_losses.clone()
            init[idx[first]] = current[first]
            self.initial_losses = init
        grad_norms = w_grads.detach().to(self.initial_losses).norm(dim=1)

        w = self.task_weights[idx].clone().requires_grad_(True)
        with torch.enable_grad():  # the loop may call combine under no_grad
            G = w * grad_norms                           # ||grad_W w_i L_i|| = w_i ||grad_W L_i||
            inverse_rate = current / self.initial_losses[idx]  # L~_i
            r = inverse_rate / inverse_rate.mean()
            target = (G.mean() * r.pow(self.alpha)).detach()   # constant, as in the paper
            loss_grad = (G - target).abs().sum()
            (grad_w,) = torch.autograd.grad(loss_grad, w)
        return grad_w
