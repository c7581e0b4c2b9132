"""``gradvac``: Gradient Vaccine (Wang, Tsvetkov, Firat & Cao 2021, "Gradient Vaccine:
Investigating and Improving Multi-task Optimization in Massively Multilingual Models", ICLR,
Sec. 3, eq. 3 and Algorithm 1).

PCGrad only acts when two gradients conflict (cosine < 0); GradVac sets each task pair a target
cosine phi^_ij, an exponential moving average of the cosines it has observed, and nudges the
gradients towards it. For each task i, start from g_i^PC = g_i and visit the other tasks j in
random order:

    phi_ij = cos(g_i^PC, g_j)
    if phi_ij < phi^_ij:                                                                 (eq. 3)
        g_i^PC <- g_i^PC + ||g_i^PC|| (phi^_ij sqrt(1 - phi_ij^2) - phi_ij sqrt(1 - phi^_ij^2))
                           / (||g_j|| sqrt(1 - phi^_ij^2)) * g_j
    phi^_ij <- (1 - beta) phi^_ij + beta phi_ij

The shared parameters get sum_i g_i^PC; every private parameter the plain sum (weights 1).
Since g_i^PC stays a combination sum_k C_ik g_k of the original gradients, every norm and cosine
above is read off the Gramian (||g_i^PC||^2 = C_i G C_i^T, <g_i^PC, g_j> = (C_i G)_j) and the update
is (sum_i C_i) J: the work is O(k^3), whatever the parameter count.

Our choices where the paper is silent (both as in LibMTL and torchjd): phi^ starts at 0, the
EMA is updated with the cosine measured before the correction, ``eps`` (1e-8) is added to the
cosine's and the correction's denominators, and the whole shared gradient is one group (the
paper also tries per-layer groups). The visiting order is ``torch.randperm(k - 1)`` over the
other tasks, drawn from a ``torch.Generator`` seeded by ``seed``; its state and phi^ (``(K, K)``
over the run's tasks, indexed by ``self.index``) are module state, so a resumed run continues
identically, and a step with only some tasks present reads and updates only their pairs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, GradientWeighting, TaskGradients
from polytask.losses.weighting.solvers import combination


@register_weighting("gradvac")
class GradVac(GradientWeighting):
    """Args:
        task_names: every task of the run.
        beta: EMA rate of the target cosines (the paper's 0.01 for languages; LibMTL's 0.5).
        eps: added to the denominators.
        seed: seed of the generator that orders the corrections.
        gradient_reducer: applied to the ``(k, P)`` per-task gradients first (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], beta: float = 0.5, eps: float = 1e-8,
                 seed: int = 0, *, gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if not 0 <= beta <= 1 or not eps >= 0:
            raise ValueError(f"gradvac needs 0 <= beta <= 1 and eps >= 0; got beta={beta!r}, "
                             f"eps={eps!r}")
        self.beta, self.eps = float(beta), float(eps)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("targets", torch.zeros(self.n_tasks, self.n_tasks,
                                                    dtype=torch.float64))

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def coefficients(self, gramian: Tensor, losses: Tensor, names: list[str]) -> Tensor:
        """``(k,)`` c = sum_i C_i with sum_i g_i^PC = sum_k c_k g_k; updates phi^."""
        g = gramian.to("cpu", torch.float64)
        k = g.shape[0]
        run = [self.index[n] for n in names]
        targets = self.targets.to("cpu").clone()
        mix = torch.eye(k, dtype=torch.float64)               # rows: g_i^PC in terms of g_k
        norms = g.diagonal().clamp_min(0).sqrt()
        for i in range(k):
            dots = mix[i] @ g                                 # <g_i^PC, g_j> for every j
            others = [j for j in range(k) if j != i]
            for p in torch.randperm(k - 1, generator=self.generator).tolist():
                j = others[p]
                norm_i = (dots @ mix[i]).clamp_min(0).sqrt()
                cosine = dots[j] / (norm_i * norms[j] + self.eps)
                target = targets[run[i], run[j]]
                if cosine < target:
                    w = norm_i * (target * (1 - cosine ** 2).clamp_min(0).sqrt()
                                  - cosine * (1 - target ** 2).clamp_min(0).sqrt()) \
                        / (norms[j] * (1 - target ** 2).clamp_min(0).sqrt() + self.eps)
                    mix[i, j] += w
                    dots = dots + w * g[j]
                targets[run[i], run[j]] = (1 - self.beta) * target + self.beta * cosine
        self.targets = targets.to(self.targets.device)
        return mix.sum(dim=0).to(gramian.device)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        c = self.coefficients(grads.gramian(), grads.losses, grads.names)
        return combination(c, grads.matrix), torch.ones_like(c)
