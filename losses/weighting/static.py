"""``static``: a fixed weighted sum, L = sum_i w_i L_i (the usual multi-task baseline)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, Weighting, weighted_sum


@register_weighting("static")
class StaticWeighting(Weighting):
    """Configured weights, default 1 for every task.

    Args:
        task_names: every task of the run.
        weights: optional task name -> weight (>= 0); tasks not listed keep 1.
        gradient_reducer: see :mod:`polytask.losses.weighting.base` (unused: no per-task gradients).
    """

    def __init__(self, task_names: Sequence[str], weights: dict[str, float] | None = None, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        weights = dict(weights or {})
        unknown = [n for n in weights if n not in self.index]
        if unknown:
            raise ValueError(f"weights for unknown tasks {unknown}; known: {', '.join(self.task_names)}")
        negative = {n: w for n, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"task weights must be >= 0, got {negative}")
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.task_names}

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        used = {n: self.weights[n] for n in losses}
        return weighted_sum(losses, used), used
