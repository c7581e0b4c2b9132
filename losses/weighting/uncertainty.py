"""``uncertainty``: homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task
Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR).

Objective, with one learned s_i = log sigma_i^2 per task:

    L = sum_i exp(-s_i) * L_i + s_i

Convention: the paper's eq. 7 (regression) is L_i / (2 sigma^2) + log sigma and eq. 10
weights a classification loss as L_i / sigma^2 + log sigma. We use the unified form above (also the
authors' later code and most libraries): one formula for every task kind, and s = log sigma^2
keeps it unconstrained and numerically stable. Its optimum for fixed L_i is exp(s_i) = L_i
(dL/ds_i = 1 - exp(-s_i) L_i); eq. 7 has the same optimum for regression, eq. 10 puts it at
sigma^2 = 2 L_i.

The s_i are ``nn.Parameter``s: add ``weighting.parameters()`` to the optimizer. One parameter
per task, so a task absent from a step gets no gradient (``.grad`` stays ``None``) and the
optimizer leaves it alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, Weighting


@register_weighting("uncertainty")
class UncertaintyWeighting(Weighting):
    """Args:
        task_names: every task of the run.
        init_log_var: initial s_i (0: every weight exp(-s) starts at 1).
        gradient_reducer: see :mod:`polytask.losses.weighting.base` (unused: no per-task gradients).
    """

    def __init__(self, task_names: Sequence[str], init_log_var: float = 0.0, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        self.log_vars = nn.ParameterList(
            [nn.Parameter(torch.tensor(float(init_log_var))) for _ in self.task_names])

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        total, used = None, {}
        for name, loss in losses.items():
            s = self.log_vars[self.index[name]]
            term = torch.exp(-s) * loss + s
            total = term if total is None else total + term
            used[name] = float(torch.exp(-s.detach()))
        return total, used
