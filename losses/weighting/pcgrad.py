"""``pcgrad``: projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman & Finn 2020,
"Gradient Surgery for Multi-Task Learning", NeurIPS, Algorithm 1).

For each task i, start from g_i^PC = g_i (its gradient on the shared parameters) and visit the
other tasks j in random order; whenever g_i^PC . g_j < 0 (conflict), remove the conflicting
component:

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

The shared parameters receive sum_i g_i^PC; every other parameter (task heads, private
layers) the plain sum of task gradients; ``extra`` terms are added unprojected everywhere.
The random order comes from a ``torch.Generator`` seeded by ``seed``; its state is part of
the module's ``state_dict`` (extra state) so a resumed run continues the same sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import (GradientReducer, Weighting, add_flat_grad, run_backward,
                                            task_gradients, weighted_sum)


def project_conflicting(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's surgery on stacked task gradients ``(k, P)`` -> combined update ``(P,)``."""
    k = grads.shape[0]
    projected = grads.clone()
    for i in range(k):
        others = [j for j in torch.randperm(k, generator=generator).tolist() if j != i]
        for j in others:
            dot = projected[i] @ grads[j]
            if dot < 0:  # conflict: drop the component of g_i^PC along g_j
                projected[i] = projected[i] - dot / grads[j].pow(2).sum() * grads[j]
    return projected.sum(dim=0)


@register_weighting("pcgrad")
class PCGrad(Weighting):
    """Args:
        task_names: every task of the run.
        seed: seed of the generator that orders the projections.
        gradient_reducer: applied to the ``(k, P)`` per-task gradients on the shared parameters
            before the projections (see :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], seed: int = 0, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        self.generator = torch.Generator().manual_seed(int(seed))

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], *,
                 extra: Tensor | None = None,
                 last_shared: Sequence[nn.Parameter] | None = None) -> dict[str, float]:
        present = self.present(losses)
        if not present:
            run_backward(None, extra)
            return {}
        losses = {n: losses[n] for n in present}
        shared = [p for p in shared_params if p.requires_grad]
        grads = task_gradients(losses, shared, reduce=self.gradient_reducer)      # name -> (P,)
        stacked = torch.stack([grads[n] for n in present])                  # (k, P)
        surgery = project_conflicting(stacked, self.generator)
        # One backward of the plain sum gives private parameters (and extra) their gradients;
        # on the shared ones, swap the plain sum for the projected one.
        used = {n: 1.0 for n in present}
        run_backward(weighted_sum(losses, used), extra)
        add_flat_grad(shared, surgery - stacked.sum(dim=0))
        return used
