"""``famo``: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu 2023, NeurIPS,
Sec. 3, Algorithm 1).

Task logits xi give weights z = softmax(xi). The model follows

    d = c * sum_i (z_i / l_i) grad l_i,   c = (sum_i z_i / l_i)^-1

i.e. the gradient of the objective c * sum_i z_i log l_i with c held constant; l_i is the task
loss minus an optional lower bound (``min_losses``) plus ``eps``. After the model step the
change in log-losses updates the logits (Algorithm 1):

    delta = J_z(xi)^T [log l_i(theta_t) - log l_i(theta_t+1)]_i,   xi <- xi - lr * (delta + gamma * xi)

so tasks whose loss fell faster lose weight. The step on xi (``optimizer``):

- ``"adam"`` (default): the authors' code (github.com/Cranial-XIX/FAMO, ``famo.py``
  ``FAMO.update``; LibMTL's ``FAMO``) — ``torch.optim.Adam([xi], lr=w_lr, weight_decay=gamma)``
  fed the gradient delta, i.e. g = delta + gamma * xi, then Adam's bias-corrected step with
  betas (0.9, 0.999) and eps 1e-8. Written out here (no optimizer object) so its moments and
  step count are buffers and a resumed run continues bit-identically.
- ``"sgd"``: Algorithm 1's plain step xi <- xi - lr * (delta + gamma * xi). Log-loss changes
  per step are small, so at lr = 0.025 the logits hardly move; Adam's normalised step moves
  them by about lr per step whatever the loss scale.

Defaults lr = 0.025 (``w_lr`` in the authors' code and LibMTL) and gamma = 1e-3 (LibMTL's
``FAMO_w_gamma``; the authors' standalone ``famo.py`` uses 0.01, their ``methods/
weight_methods.py`` 1e-5, and their run scripts tune it per benchmark).

The weights ``backward`` reports are the effective weights on grad L_i, c z_i / l_i: scale-free
by design, so a task with a small loss gets a large one. The balance FAMO controls is z, i.e.
equal *relative* (log-loss) decrease across tasks.

How l(theta_t+1) is observed in our loop: (a) the paper's protocol — the loop re-evaluates the
same batch after ``optimizer.step()`` and calls ``after_step(new_losses)``; or (b) if
``after_step`` was not called, the next ``backward`` uses *its* losses (next batch, no extra
forward, noisier). Only tasks present in both observations are updated; a step's softmax runs
over its present tasks only, so absent tasks keep their logits and Adam moments (each task
has its own Adam step count; with every task present this is exactly ``torch.optim.Adam``).
xi is a buffer, not a parameter: the update above is the only rule that changes it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, Weighting


@register_weighting("famo")
class FAMO(Weighting):
    """Args:
        task_names: every task of the run.
        lr: beta, step size of the logits (``w_lr`` = 0.025 in the authors' code).
        gamma: weight decay pulling xi towards 0 (equal weights); Adam's ``weight_decay``.
        optimizer: ``"adam"`` (the authors' code, default) or ``"sgd"`` (Algorithm 1's step).
        min_losses: optional task name -> lower bound of its loss (default 0).
        eps: added inside the log for stability.
        gradient_reducer: see :mod:`polytask.losses.weighting.base` (unused: no per-task gradients).
    """

    def __init__(self, task_names: Sequence[str], lr: float = 0.025, gamma: float = 1e-3,
                 min_losses: dict[str, float] | None = None, eps: float = 1e-8,
                 optimizer: str = "adam", *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if lr <= 0 or gamma < 0 or eps < 0:
            raise ValueError(f"need lr > 0, gamma >= 0, eps >= 0; got lr={lr}, gamma={gamma}, eps={eps}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"famo optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.optimizer = optimizer
        min_losses = dict(min_losses or {})
        self.present(min_losses)
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        self.register_buffer("logits", torch.zeros(self.n_tasks, dtype=torch.float64))
        self.register_buffer("min_losses", torch.tensor(
            [float(min_losses.get(n, 0.0)) for n in self.task_names], dtype=torch.float64))
        # Adam's first / second moments and per-task step count (unused by "sgd")
        self.register_buffer("adam_m", torch.zeros(self.n_tasks, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(self.n_tasks, dtype=torch.float64))
        self.register_buffer("adam_step", torch.zeros(self.n_tasks, dtype=torch.int64))
        # l(theta_t) of the last backward, waiting for its l(theta_t+1); NaN = none pending
        self.register_buffer("pending", torch.full((self.n_tasks,), math.nan, dtype=torch.float64))

    def z(self, names: Sequence[str] | None = None) -> Tensor:
        """softmax(xi) over ``names`` (default all tasks), ``(k,)``."""
        idx = [self.index[n] for n in (names if names is not None else self.task_names)]
        return torch.softmax(self.logits[idx], dim=0)

    def _shifted(self, name: str, loss: Tensor) -> Tensor:
        return loss - self.min_losses[self.index[name]].to(loss.dtype) + self.eps

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if bool(torch.isfinite(self.pending).any()):
            self._update_logits({n: l.detach() for n, l in losses.items()})   # route (b)
        names = list(losses)
        z = self.z(names)
        shifted = {n: self._shifted(n, losses[n]) for n in names}
        value = {n: float(shifted[n].detach()) for n in names}
        bad = {n: float(losses[n].detach()) for n in names if not value[n] > 0}
        if bad:  # log l is undefined: the configured lower bound is wrong
            raise ValueError(f"famo needs losses above their min_losses; got {bad} with "
                             f"min_losses {dict(zip(self.task_names, self.min_losses.tolist()))}")
        c = 1.0 / sum(float(z[i]) / value[n] for i, n in enumerate(names))   # constant in d
        total = None
        for i, n in enumerate(names):
            term = c * float(z[i]) * torch.log(shifted[n])
            total = term if total is None else total + term
        pending = torch.full_like(self.pending, math.nan)
        for n in names:
            pending[self.index[n]] = float(losses[n].detach())
        self.pending = pending
        # effective weight on grad L_i: c z_i / l_i
        used = {n: c * float(z[i]) / value[n] for i, n in enumerate(names)}
        return total, used

    def after_step(self, new_losses: dict[str, Tensor] | dict[str, float]) -> None:
        self.present(new_losses)
        self._update_logits({n: torch.as_tensor(v).detach() for n, v in new_losses.items()})

    def _update_logits(self, new_losses: dict[str, Tensor]) -> None:
        names = [n for n in self.task_names
                 if n in new_losses and math.isfinite(float(self.pending[self.index[n]]))]
        if names:
            idx = torch.tensor([self.index[n] for n in names])
            before = self.pending[idx]
            after = torch.stack([new_losses[n].to(self.pending) for n in names])
            bound = self.min_losses[idx]
            change = torch.log(before - bound + self.eps) - torch.log(after - bound + self.eps)
            z = torch.softmax(self.logits[idx], dim=0)
            delta = z * (change - (z * change).sum())       # J_z^T change for the softmax
            logits = self.logits.clone()
            logits[idx] = self._step(idx, delta)
            self.logits = logits
        self.pending = torch.full_like(self.pending, math.nan)

    def _step(self, idx: Tensor, delta: Tensor) -> Tensor:
        """New logits xi[idx] after one step with gradient ``delta`` (weight decay included)."""
        xi = self.logits[idx]
        grad = delta + self.gamma * xi                   # torch.optim's L2 weight_decay
        if self.optimizer == "sgd":
            return xi - self.lr * grad
        beta1, beta2, eps = 0.9, 0.999, 1e-8             # torch.optim.Adam's defaults
        m = beta1 * self.adam_m[idx] + (1 - beta1) * grad
        v = beta2 * self.adam_v[idx] + (1 - beta2) * grad * grad
        step = self.adam_step[idx] + 1
        self.adam_m[idx], self.adam_v[idx], self.adam_step[idx] = m, v, step
        correction1 = 1 - beta1 ** step.to(xi.dtype)      # the buffers' dtype (the loop may cast them)
        correction2 = 1 - beta2 ** step.to(xi.dtype)
        return xi - self.lr / correction1 * m / (v.sqrt() / correction2.sqrt() + eps)
