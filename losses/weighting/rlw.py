"""``rlw``: Random Loss Weighting (Lin, Ye, Xu, Shi, Zhang & Kwok 2022, "Reasonable
Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning", TMLR, Sec. 3,
eq. 3 and Algorithm 1).

At every step the weights are drawn afresh and normalised by a softmax:

    lambda~ ~ N(0, I_k),   lambda = softmax(lambda~),   objective sum_i lambda_i L_i

The paper compares several distributions for lambda~ (uniform, normal, Dirichlet, Bernoulli ...);
the standard normal is the one its experiments and LibMTL use, and the only one here. No
per-task gradients: an objective-style weighting.

Our choices where the paper is silent: the draw is ``torch.randn(k, dtype=float64)`` from a
``torch.Generator`` seeded by ``seed`` (its state is module state, so a resumed run continues the
same sequence and data-parallel ranks agree); on a step with only some tasks present, k is the
number present and the softmax runs over them only, so their weights still sum to 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, Seeded, Weighting, weighted_sum


@register_weighting("rlw")
class RandomLossWeighting(Seeded, Weighting):
    """Args:
        task_names: every task of the run.
        seed: seed of the generator that draws the weights.
        gradient_reducer: see :mod:`polytask.losses.weighting.base` (unused: no per-task gradients).
    """

    def __init__(self, task_names: Sequence[str], seed: int = 0, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        self.seed_generator(seed)

    def draw(self, k: int) -> Tensor:
        """The next ``(k,)`` weights, softmax of a standard normal draw (float64)."""
        return torch.softmax(torch.randn(k, generator=self.generator, dtype=torch.float64), dim=0)

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        used = dict(zip(losses, self.draw(len(losses)).tolist()))
        return weighted_sum(losses, used), used
