"""``dwa``: Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning
with Attention", CVPR, Sec. 3.3, eq. 7).

    w_k(t) = K * exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T),   r_k(t-1) = L_k(t-1) / L_k(t-2)

In the paper L_k(t) is task k's mean training loss over *epoch* t (T = 2), and w = 1 for the
first two epochs. Our "epoch" is a **window of ``window`` steps** (default 10): task k's mean
loss over its last ``window`` observed losses. Why not epochs: a run here often has only a few
evaluation intervals (or one pass over the data), and DWA needs two finished windows before it
adapts at all, so epoch-sized windows left it equal to static weighting for most short runs.
With windows in steps, the weights move after ``2 * window`` steps and then change once per
window — the same rule, on a finer clock (LibMTL's DWA also keeps per-epoch losses; ``window``
set to the steps per epoch recovers the paper exactly, see the tests).

The update is driven by :meth:`backward` alone: each call first computes the weights from the
windows finished so far (so step t's weights depend only on losses before t, as in the paper),
then adds the step's detached losses to the open window. A "step" is one ``backward`` call
(one micro-batch under gradient accumulation; the ratio r is unchanged by the loop's
``1 / grad_accum`` scaling). Windows are per task: a task absent from a step (mixed batches)
neither adds to nor closes its window, and a task without two finished windows gets the
neutral ratio r = 1. :meth:`end_epoch` is a no-op kept for the interface.

State (finished windows, the open window's sum and count) lives in buffers, so a checkpoint
restores it bit-identically.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, Weighting, weighted_sum


@register_weighting("dwa")
class DynamicWeightAverage(Weighting):
    """Args:
        task_names: every task of the run (K = their number).
        temperature: T (2 in the paper); larger T -> weights closer to 1.
        window: steps (``backward`` calls in which the task is present) averaged into one
            L_k(t); the paper's epoch. Default 10.
        gradient_reducer: see :mod:`polytask.losses.weighting.base` (unused: no per-task gradients).
    """

    def __init__(self, task_names: Sequence[str], temperature: float = 2.0, window: int = 10, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if not temperature > 0:
            raise ValueError(f"temperature = {temperature} must be > 0")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window = {window!r} must be an int >= 1 (steps per DWA 'epoch')")
        self.temperature = float(temperature)
        self.window = window
        # rows: L(t-1), L(t-2) (finished windows); NaN = not observed yet.
        self.register_buffer("history", torch.full((2, self.n_tasks), math.nan, dtype=torch.float64))
        # the open window: sum of the losses seen so far and how many (per task)
        self.register_buffer("window_sum", torch.zeros(self.n_tasks, dtype=torch.float64))
        self.register_buffer("window_count", torch.zeros(self.n_tasks, dtype=torch.int64))

    def weights(self) -> Tensor:
        """Current w_k for all K tasks from the finished windows, ``(K,)``."""
        ratio = self.history[0] / self.history[1]
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        return self.n_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def observe(self, losses: dict[str, Tensor] | dict[str, float]) -> None:
        """Add one step's losses to the open windows; close each window that is full."""
        for name in self.present(losses):
            i = self.index[name]
            self.window_sum[i] += float(torch.as_tensor(losses[name]).detach())
            self.window_count[i] += 1
            if int(self.window_count[i]) == self.window:
                self.history[1, i] = self.history[0, i]
                self.history[0, i] = self.window_sum[i] / self.window
                self.window_sum[i] = 0.0
                self.window_count[i] = 0

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        w = self.weights()                       # from windows finished before this step
        used = {n: float(w[self.index[n]]) for n in losses}
        self.observe(losses)
        return weighted_sum(losses, used), used

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        """No-op: DWA's windows are counted in steps by :meth:`backward` (names still checked)."""
        self.present(mean_losses)
