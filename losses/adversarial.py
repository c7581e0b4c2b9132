"""Adversarial multi-task learning (Liu, Qiu & Huang 2017, "Adversarial Multi-task Learning
for Text Classification", ACL 2017, Sec. 4.1).

A task discriminator D tries to tell from the *shared* features which task an input came from;
the shared encoder is trained to make that impossible, so the shared space holds
task-invariant features. The paper's min-max objective L_Adv (Sec. 4.1)

    L_adv = min_{theta_s} ( lambda * max_{theta_D} sum_k sum_i d_i^k log D(E(x_i^k)) )

is implemented with a gradient-reversal layer (Ganin & Lempitsky 2015, "Unsupervised Domain
Adaptation by Backpropagation", ICML): D minimises the cross-entropy of its task prediction,
and the reversed gradient makes the shared encoder maximise it, in one backward pass.

Pieces (all work on tensors, none on model classes):
    GradientReversal          identity forward, gradient * (-lambda) backward
    ganin_lambda(p, gamma)    the schedule lambda_p = 2 / (1 + exp(-gamma p)) - 1
    TaskDiscriminator         GRL -> masked mean pool -> MLP -> task logits (b, k)
    AdversarialLoss ("adversarial")  CE(task logits, task ids)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.losses.registry import register


class _ReverseGrad(torch.autograd.Function):
    """y = x; dL/dx = -lambda * dL/dy."""

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:  # type: ignore[override]
        ctx.lambda_ = lambda_
        return x.view_as(x)  # a view, so autograd records this node even though values match

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.lambda_ * grad, None


def grad_reverse(x: Tensor, lambda_: float = 1.0) -> Tensor:
    """Functional gradient reversal: returns ``x``; its gradient is multiplied by ``-lambda_``."""
    return _ReverseGrad.apply(x, float(lambda_))


def ganin_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin & Lempitsky (2015), Sec. 5.2.2: lambda_p = 2 / (1 + exp(-gamma * p)) - 1.

    ``progress`` p in [0, 1] is the fraction of training done; lambda grows from 0 to ~1,
    which suppresses the discriminator's noisy signal early in training.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress = {progress} must be in [0, 1]")
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class GradientReversal(nn.Module):
    """Gradient-reversal layer with a fixed lambda or Ganin's schedule.

    Args:
        lambda_: the fixed coefficient (``schedule="fixed"``), or the maximum the schedule
            is scaled to (``schedule="ganin"``: lambda = lambda_ * ganin_lambda(progress)).
        schedule: ``fixed`` or ``ganin``.
        gamma: the schedule's steepness (10 in the paper).

    The training loop calls ``set_progress(step / max_steps)``; ``forward(x) -> x`` (any shape).
    """

    def __init__(self, lambda_: float = 1.0, schedule: str = "fixed", gamma: float = 10.0) -> None:
        super().__init__()
        if schedule not in ("fixed", "ganin"):
            raise ValueError(f"schedule {schedule!r} must be one of 'fixed', 'ganin'")
        if lambda_ < 0:
            raise ValueError(f"lambda_ = {lambda_} must be >= 0")
        self.max_lambda = float(lambda_)
        self.schedule = schedule
        self.gamma = float(gamma)
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress = {progress} must be in [0, 1]")
        self.progress = float(progress)

    @property
    def lambda_(self) -> float:
        if self.schedule == "fixed":
            return self.max_lambda
        return self.max_lambda * ganin_lambda(self.progress, self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.max_lambda}, schedule={self.schedule!r}"


class TaskDiscriminator(nn.Module):
    """Predicts the task from pooled shared features, behind a gradient-reversal layer.

    Args:
        d_model: feature size d of the shared encoder.
        n_tasks: number of tasks k.
        hidden: hidden width of the MLP (Liu et al. use one hidden layer).
        grl: the reversal layer; ``None``: ``GradientReversal(1.0)``.

    ``forward(features (b, d) or (b, s, d), mask (b, s) bool | None) -> logits (b, k)``;
    sequence features are mean-pooled over the real tokens (mask True).
    """

    def __init__(self, d_model: int, n_tasks: int, hidden: int = 128,
                 grl: GradientReversal | None = None) -> None:
        super().__init__()
        if n_tasks < 2:
            raise ValueError(f"a task discriminator needs >= 2 tasks, got n_tasks={n_tasks}")
        self.grl = grl if grl is not None else GradientReversal(1.0)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, n_tasks))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.grl(features)
        if x.ndim == 3:
            if mask is None:
                x = x.mean(dim=1)
            else:
                m = mask.to(x.dtype).unsqueeze(-1)                       # (b, s, 1)
                x = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)     # (b, d)
        elif x.ndim != 2:
            raise ValueError(f"features must be (b, d) or (b, s, d), got {tuple(x.shape)}")
        return self.mlp(x)


@register("adversarial")
class AdversarialLoss(nn.Module):
    """Liu et al. (2017) L_Adv as a loss: ``forward(task_logits (b, k), task_ids (b,)) -> ()``,
    the cross-entropy of the discriminator's task prediction (mean over rows).

    The sign of the min-max lives in the gradient-reversal layer of :class:`TaskDiscriminator`,
    so this loss is simply added (times its weight) to the total objective.
    """

    def forward(self, task_logits: Tensor, task_ids: Tensor) -> Tensor:
        if task_logits.ndim != 2 or task_ids.shape != task_logits.shape[:1]:
            raise ValueError(f"expects task_logits (b, k) and task_ids (b,), got "
                             f"{tuple(task_logits.shape)} and {tuple(task_ids.shape)}")
        return F.cross_entropy(task_logits, task_ids)
