"""``graddrop``: Gradient Sign Dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov
2020, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
NeurIPS, eq. 1-3 and Algorithm 1).

Per coordinate of the shared gradient, GradDrop keeps the gradients of one sign and drops the
others, choosing the sign at random in proportion to how much of the total gradient points that
way (the "positive sign purity"):

    P = 1/2 (1 + sum_i g_i / sum_i |g_i|)                                                (eq. 1)
    U ~ Uniform(0, 1), one draw per coordinate
    M_i = [P > U] [g_i > 0] + [P < U] [g_i < 0]                                          (eq. 2)
    update = sum_i (l + (1 - l) M_i) g_i                                                 (eq. 3)

with leak l in [0, 1] (l = 1: the plain sum). Every private parameter gets the plain sum
(weights 1).

Our choices where the paper is silent or differs: the paper applies GradDrop to the gradient of
a shared *activation* (summed over the batch after multiplying by the sign of the input); here,
as in torchjd's ``GradDrop``, it acts on the task gradients of the shared parameters, the only
per-task quantity this interface sees. A coordinate where every g_i is 0 gets P = 1/2 (it
contributes nothing anyway; LibMTL adds 1e-7 to the denominator instead). U is drawn in the
gradients' dtype from a CPU ``torch.Generator`` seeded by ``seed`` and then moved to their
device, so every device and every data-parallel rank draws the same U; the generator's state is
module state, so a resumed run continues the same sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import (GradientReducer, GradientWeighting, Seeded,
                                            TaskGradients)


def sign_dropout(matrix: Tensor, uniform: Tensor, leak: float = 0.0,
                 chunk: int = 1 << 16) -> Tensor:
    """GradDrop's update (eq. 1-3) for ``(k, P)`` gradients and ``(P,)`` uniform draws.

    Every quantity is per column, so the columns are processed ``chunk`` at a time: the
    temporaries (masks, products) are ``k x chunk``, not another few copies of ``k x P``."""
    out = matrix.new_empty(matrix.shape[1])
    for start in range(0, matrix.shape[1], chunk):
        m, u = matrix[:, start:start + chunk], uniform[start:start + chunk]
        total = m.abs().sum(dim=0)
        purity = torch.where(total > 0, 0.5 * (1 + m.sum(dim=0) / total.where(total > 0, 1)),
                             torch.full_like(total, 0.5))
        keep = (purity > u) & (m > 0) | (purity < u) & (m < 0)
        out[start:start + chunk] = ((leak + (1 - leak) * keep.to(m.dtype)) * m).sum(dim=0)
    return out


@register_weighting("graddrop")
class GradDrop(Seeded, GradientWeighting):
    """Args:
        task_names: every task of the run.
        leak: fraction of every gradient that always passes (0: none, the paper's default).
        seed: seed of the generator that draws U.
        gradient_reducer: applied to the ``(k, P)`` per-task gradients first (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], leak: float = 0.0, seed: int = 0, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if not 0 <= leak <= 1:
            raise ValueError(f"graddrop leak must be in [0, 1], got {leak!r}")
        self.leak = float(leak)
        self.seed_generator(seed)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        m = grads.matrix
        uniform = torch.rand(m.shape[1], generator=self.generator, dtype=m.dtype).to(m.device)
        weights = torch.ones(m.shape[0], dtype=torch.float64, device=m.device)
        return sign_dropout(m, uniform, self.leak), weights
