"""``imtl``: Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang 2021,
"Towards Impartial Multi-task Learning", ICLR, Sec. 3 and Algorithm 1).

**IMTL-L** (loss balance, Sec. 3.2): each task has a learnable s_i and is trained on the scaled
loss ``e^{s_i} L_i - s_i``; its minimum over s_i is at e^{s_i} L_i = 1, so every scaled loss is
kept near 1. The s_i are ``nn.Parameter``s (add ``weighting.parameters()`` to the optimizer, as
for ``uncertainty``) and get d/ds_i = e^{s_i} L_i - 1.

**IMTL-G** (gradient balance, Sec. 3.1): the shared update g = sum_i alpha_i g_i, with
sum_i alpha_i = 1, has equal projections onto every task's unit gradient u_i = g_i / ||g_i||.
The paper's closed form is alpha_{2:k} = g_1 U^T (D U^T)^{-1}, D_i = g_1 - g_i, U_i = u_1 - u_i,
alpha_1 = 1 - sum alpha_{2:k}. Equivalently (g^T u_i equal for all i <=> G alpha proportional to
the norms n = sqrt(diag G)): alpha = G^+ n / (1^T G^+ n), which needs the Gramian only and, with
the pseudo-inverse, also covers linearly dependent gradients (torchjd's IMTLG generalisation).
When 1^T G^+ n = 0 no such combination exists and the update is 0.

**Hybrid** (Algorithm 1, the paper's IMTL): IMTL-G on the gradients of the *scaled* losses,
e^{s_i} g_i. ``mode``: ``hybrid`` (default), ``g`` or ``l``.

Parameter updates, per Algorithm 1: shared parameters get sum_i alpha_i e^{s_i} g_i (``g``:
sum_i alpha_i g_i; ``l``: sum_i e^{s_i} g_i); task-specific parameters get the gradient of their
own scaled loss, i.e. weight e^{s_i} (``g``: 1); the s_i get e^{s_i} L_i - 1 (``hybrid``, ``l``).
In ``hybrid`` mode that gradient of the s_i is accumulated by :meth:`combine`, from the detached
losses, so it is the same whether the gradients come from ``backward`` or the training loop's
one-pass engine; ``l`` needs no per-task gradients and ``backward`` then takes the plain
objective path.

Our choices where the paper is silent: s_i starts at ``init_log_scale`` (0, as LibMTL); one
parameter per task, so an absent task's s_i gets no gradient (``.grad`` stays None).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import (GradientReducer, GradientWeighting, TaskGradients,
                                            Weighting)
from polytask.losses.weighting.solvers import combination

MODES = ("hybrid", "g", "l")


def imtl_g_coefficients(gramian: Tensor) -> Tensor:
    """IMTL-G's alpha, ``(k,)``, summing to 1 (or zeros when no equal-projection combination
    exists), from the ``(k, k)`` Gramian."""
    norms = gramian.diagonal().clamp_min(0).sqrt()
    v = torch.linalg.pinv(gramian, hermitian=True) @ norms
    total = v.sum()
    if total.abs() <= 1e-12 * v.abs().sum().clamp_min(torch.finfo(v.dtype).tiny):
        return torch.zeros_like(v)
    return v / total


@register_weighting("imtl")
class IMTL(GradientWeighting):
    """Args:
        task_names: every task of the run.
        mode: ``hybrid`` (IMTL, default), ``g`` (IMTL-G only) or ``l`` (IMTL-L only).
        init_log_scale: initial s_i (``hybrid`` and ``l``).
        gradient_reducer: applied to the ``(k, P)`` per-task gradients before IMTL-G (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], mode: str = "hybrid",
                 init_log_scale: float = 0.0, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if mode not in MODES:
            raise ValueError(f"imtl mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.log_scales = nn.ParameterList(
            [] if mode == "g" else
            [nn.Parameter(torch.tensor(float(init_log_scale))) for _ in self.task_names])

    def scales(self, names: list[str]) -> Tensor:
        """``(k,)`` e^{s_i} of the tasks ``names`` (float64, detached; ones in mode ``g``)."""
        if self.mode == "g":
            return torch.ones(len(names), dtype=torch.float64)
        return torch.stack([self.log_scales[self.index[n]].detach().double().exp()
                            for n in names])

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """IMTL-L alone: sum_i e^{s_i} L_i - s_i (mode ``l``)."""
        total, used = None, {}
        for name, loss in losses.items():
            s = self.log_scales[self.index[name]]
            term = torch.exp(s) * loss - s
            total = term if total is None else total + term
            used[name] = float(torch.exp(s.detach()))
        return total, used

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], *,
                 extra: Tensor | None = None,
                 last_shared: Sequence[nn.Parameter] | None = None) -> dict[str, float]:
        if self.mode == "l":   # no per-task gradients needed
            return Weighting.backward(self, losses, shared_params, extra=extra)
        return super().backward(losses, shared_params, extra=extra, last_shared=last_shared)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        scales = self.scales(grads.names).to(grads.matrix.device)
        if self.mode == "l":
            coefs = scales
        else:
            gramian = grads.gramian()
            alpha = imtl_g_coefficients(gramian * scales[:, None] * scales[None, :])
            coefs = alpha * scales   # alpha combines the scaled gradients e^{s_i} g_i
        if self.mode != "g":
            self._accumulate_scale_gradients(grads.names, grads.losses)
        return combination(coefs, grads.matrix), scales

    def _accumulate_scale_gradients(self, names: list[str], losses: Tensor) -> None:
        """d/ds_i (e^{s_i} L_i - s_i) = e^{s_i} L_i - 1 into ``s_i.grad``, like a backward."""
        with torch.enable_grad():
            params = [self.log_scales[self.index[n]] for n in names]
            total = sum(torch.exp(s) * loss.to(s) - s for s, loss in zip(params, losses))
            total.backward()
