"""``db_mtl``: Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Shi, Zhang & Kwok 2023,
"Dual-Balancing for Multi-Task Learning", arXiv:2308.12029, Sec. 3 and Algorithm 1).

Two balances:

* **loss scale**: each task is trained on log L_i, whose gradient g_i / L_i does not change when
  the loss is multiplied by a constant;
* **gradient magnitude**: an EMA of each task's log-loss gradient on the shared parameters,

      m_i <- beta_t m_i + (1 - beta_t) g_i / (L_i + eps),    beta_t = beta / t^sigma

  is rescaled to the largest norm among the tasks: alpha_i = max_j ||m_j|| / (||m_i|| + eps),
  and the shared parameters get sum_i alpha_i m_i.

Every private parameter gets the gradient of its own log loss, i.e. weight 1 / (L_i + eps) on
grad L_i; those are the reported weights. ``beta`` (0.9), ``beta_sigma`` (sigma, 0: a constant
rate) and ``eps`` (1e-8) are LibMTL's ``DB_beta``, ``DB_beta_sigma`` and its constant, and the
EMA starts from zero without bias correction, as there.

Our choices where the paper is silent: the EMA and the step count t are per task (indexed by
``self.index``), so an absent task's EMA is left alone and the max of alpha runs over the present
tasks. The EMA (``(K, P)``, the gradients' dtype and device, created at the first step) and the
step counts are buffers: a resumed run continues identically. It is model-sized state: K copies
of the shared parameters.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from polytask.losses.registry import register_weighting
from polytask.losses.weighting.base import GradientReducer, GradientWeighting, TaskGradients


@register_weighting("db_mtl")
class DBMTL(GradientWeighting):
    """Args:
        task_names: every task of the run.
        beta: EMA rate of the log-loss gradients.
        beta_sigma: decay exponent of the rate, beta_t = beta / t^beta_sigma.
        eps: added to the losses and to the EMA norms.
        gradient_reducer: applied to the ``(k, P)`` per-task gradients first (see
            :mod:`polytask.losses.weighting.base`).
    """

    def __init__(self, task_names: Sequence[str], beta: float = 0.9, beta_sigma: float = 0.0,
                 eps: float = 1e-8, *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__(task_names, gradient_reducer=gradient_reducer)
        if not 0 <= beta < 1 or not beta_sigma >= 0 or not eps >= 0:
            raise ValueError(f"db_mtl needs 0 <= beta < 1, beta_sigma >= 0, eps >= 0; got "
                             f"beta={beta!r}, beta_sigma={beta_sigma!r}, eps={eps!r}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self.register_buffer("momentum", torch.zeros(self.n_tasks, 0))
        self.register_buffer("steps", torch.zeros(self.n_tasks, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The EMA is created at the first step, with the shared parameters' size: take the saved
        # shape (and dtype) before the ordinary copy.
        saved = state_dict.get(prefix + "momentum")
        if isinstance(saved, Tensor):
            self.momentum = torch.zeros_like(saved, device=self.momentum.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        m = grads.matrix
        if self.momentum.shape[1] == 0:
            self.momentum = torch.zeros(self.n_tasks, m.shape[1], dtype=m.dtype, device=m.device)
        if self.momentum.shape[1] != m.shape[1]:
            raise ValueError(f"db_mtl: the shared parameters changed size from "
                             f"{self.momentum.shape[1]} to {m.shape[1]} since the first step")
        idx = torch.tensor([self.index[n] for n in grads.names], device=self.steps.device)
        self.steps = self.steps.index_add(0, idx, torch.ones_like(idx))
        rate = (self.beta / self.steps[idx].double() ** self.beta_sigma).to(m)
        inverse = 1.0 / (grads.losses.to(m.device) + self.eps)            # d log(L + eps) / dL
        # ema <- log_grad + rate (ema - log_grad) = rate ema + (1 - rate) grad / (L + eps),
        # row by row in place: no k x P temporaries next to the k x P state
        rows = idx.tolist()
        with torch.no_grad():
            for i, j in enumerate(rows):
                self.momentum[j].mul_(rate[i]).add_(m[i], alpha=float((1 - rate[i]) * inverse[i]))
            norms = torch.stack([self.momentum[j].norm() for j in rows])
            alpha = norms.max() / (norms + self.eps)
            update = torch.zeros_like(m[0])
            for a, j in zip(alpha.tolist(), rows):
                update.add_(self.momentum[j].to(m), alpha=a)
        return update, inverse
