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
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import (GradientReducer, Weighting, run_backward, task_gradients,
                                            weighted_sum)


@register_weighting("gradnorm")
class GradNorm(Weighting):
    """Args:
        task_names: every task of the run (K = their number).
        alpha: restoring-force strength (0: equal gradient norms; paper uses 0.12 - 3).
        lr: learning rate of the weights' gradient step.
        min_weight: floor applied before renormalisation (see module docstring).
        gradient_reducer: applied to the ``(k, P)`` per-task gradients on the last shared layer
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

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], *,
                 extra: Tensor | None = None,
                 last_shared: Sequence[nn.Parameter] | None = None) -> dict[str, float]:
        present = self.present(losses)
        if not present:
            run_backward(None, extra)
            return {}
        losses = {n: losses[n] for n in present}
        idx = torch.tensor([self.index[n] for n in present])
        w_now = self.task_weights[idx].clone()
        used = {n: float(w) for n, w in zip(present, w_now)}

        grad_w = self.weight_gradient(losses, list(last_shared or [shared_params[-1]]))
        # Algorithm 1: the network step uses w(t); w(t+1) is computed alongside.
        run_backward(weighted_sum(losses, used), extra)

        new = self.task_weights.clone()
        new[idx] = (w_now - self.lr * grad_w).clamp_min(self.min_weight)
        self.task_weights = new * (self.n_tasks / new.sum())
        return used

    def weight_gradient(self, losses: dict[str, Tensor], last_shared: list[nn.Parameter]) -> Tensor:
        """grad_w L_grad for the present tasks (run order), ``(k_present,)``; records L_i(0)."""
        names = list(losses)
        idx = torch.tensor([self.index[n] for n in names])
        # weighting state lives in float64 buffers (device of the module), whatever the losses'
        current = torch.stack([losses[n].detach().to(self.initial_losses) for n in names])
        first = torch.isnan(self.initial_losses[idx])
        if bool(first.any()):
            init = self.initial_losses.clone()
            init[idx[first]] = current[first]
            self.initial_losses = init
        grads = task_gradients(losses, last_shared, reduce=self.gradient_reducer)  # name -> (P,)
        grad_norms = torch.stack([grads[n].detach().to(self.initial_losses).norm() for n in names])

        w = self.task_weights[idx].clone().requires_grad_(True)
        G = w * grad_norms                                 # ||grad_W w_i L_i|| = w_i ||grad_W L_i||
        inverse_rate = current / self.initial_losses[idx]  # L~_i
        r = inverse_rate / inverse_rate.mean()
        target = (G.mean() * r.pow(self.alpha)).detach()   # constant, as in the paper
        loss_grad = (G - target).abs().sum()
        (grad_w,) = torch.autograd.grad(loss_grad, w)
        return grad_w
