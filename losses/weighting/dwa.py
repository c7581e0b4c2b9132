"""``dwa``: Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning
with Attention", CVPR, Sec. 3.3).

    w_k(t) = K * exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T),   r_k(t-1) = L_k(t-1) / L_k(t-2)

where L_k(t) is task k's mean loss over epoch t and T = 2. For t = 1, 2 (no two past epochs)
all weights are 1. The loop reports epoch means with ``end_epoch(mean_losses)``.

A task without two recorded epochs (or missing from an epoch: its entry is unknown) gets the
neutral ratio r = 1, which reproduces the paper's equal weights for the first two epochs.
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
        gradient_reducer: see :mod:`polytask.losses.weighting.base` (unused: no per-task gradients).
    """

    def __init__(self, task_names: Sequence[str], temperature: float = 2.0, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if temperature <= 0:
            raise ValueError(f"temperature = {temperature} must be > 0")
        self.temperature = float(temperature)
        # rows: L(t-1), L(t-2); NaN = not observed. Buffers, so checkpoints keep the history.
        self.register_buffer("history", torch.full((2, self.n_tasks), math.nan, dtype=torch.float64))

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        self.present(mean_losses)
        latest = torch.full((self.n_tasks,), math.nan, dtype=torch.float64)
        for name, value in mean_losses.items():
            latest[self.index[name]] = float(value)
        self.history = torch.stack([latest, self.history[0]])

    def weights(self) -> Tensor:
        """Current w_k for all K tasks, ``(K,)``."""
        ratio = self.history[0] / self.history[1]
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        return self.n_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        w = self.weights()
        used = {n: float(w[self.index[n]]) for n in losses}
        return weighted_sum(losses, used), used
