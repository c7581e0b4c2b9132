"""Skill routing: a small inventory of LoRA "skills" per adapted linear, mixed per task.

Polytropon (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level
Generalisation"; Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task
Generalization", section 2) keeps, for every adapted linear layer, ``n`` LoRA pairs
``(A_s, B_s)`` shared by all tasks, and learns a task x skill allocation. Task k's adapter is a
*combination of the skills' parameters* (not of their outputs)::

    w = sigmoid(z_k) / sum_s sigmoid(z_k)_s          # z_k: task k's allocation logits, (n,)
    A = sum_s w_s A_s    (r, in)      B = sum_s w_s B_s    (out, r)
    y = base(x) + (alpha / r) * (x A^T) B^T

Differences from the paper, on purpose:

* the allocation is the deterministic relaxation above at training as at evaluation; the
  paper samples a relaxed Bernoulli (Gumbel-sigmoid noise, temperature 1) during training;
* one allocation row per layer *slot* and task group, shared by the slot's adapted linears
  (the paper's code keeps one per adapted linear); the heatmap of a slot is then one matrix.

``allocation="identity"`` fixes ``w`` to the one-hot row of skill k for group k (nothing is
learned): then skill routing is exactly per-task LoRA with ``A_k, B_k`` — the test oracle, and
a teaching step between the two.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from polytask.core.peft.frozen import WrappedLinear

AllocationKind = Literal["learned", "identity"]


class SkillBank(nn.Module):
    """``n`` LoRA pairs for one linear layer: ``A`` ``(n, r, in)`` Kaiming-uniform, ``B``
    ``(n, out, r)`` zero (so every task's update starts at zero, as in LoRA)."""

    def __init__(self, n: int, in_features: int, out_features: int, r: int,
                 *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if n <= 0 or r <= 0:
            raise ValueError(f"a skill bank needs n > 0 skills and rank r > 0, got n={n}, r={r}")
        self.n, self.r = n, r
        self.A = nn.Parameter(torch.empty(n, r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(n, out_features, r, device=device, dtype=dtype))
        for s in range(n):   # LoRA's init for A (loralib / PEFT), one skill at a time
            nn.init.kaiming_uniform_(self.A.data[s], a=math.sqrt(5))

    def combine(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w (n,)`` -> ``(A (r, in), B (out, r))`` = ``sum_s w_s A_s``, ``sum_s w_s B_s``."""
        w = w.to(self.A.dtype)
        return torch.einsum("s,sri->ri", w, self.A), torch.einsum("s,sor->or", w, self.B)

    def extra_repr(self) -> str:
        return f"skills={self.n}, r={self.r}, in={self.A.shape[2]}, out={self.B.shape[1]}"


class Allocation(nn.Module):
    """One task group's row of the task x skill allocation at one layer slot.

    ``learned``: logits ``z`` ``(n,)`` starting at 0 (every skill weighted ``1/n``);
    ``identity``: a fixed one-hot row on skill ``index`` (a buffer: nothing trains).
    ``weights()`` -> ``(n,)``, non-negative, summing to 1.
    """

    def __init__(self, n: int, kind: AllocationKind = "learned", index: int = 0) -> None:
        super().__init__()
        if kind not in ("learned", "identity"):
            raise ValueError(f"allocation = {kind!r} is invalid: expected 'learned' or 'identity'")
        if kind == "identity" and not 0 <= index < n:
            raise ValueError(f"identity allocation: group {index} has no skill of its own among "
                             f"{n} skills; use skills >= the number of adapter groups")
        self.kind, self.n = kind, n
        if kind == "learned":
            self.logits = nn.Parameter(torch.zeros(n))
        else:
            self.register_buffer("onehot", nn.functional.one_hot(torch.tensor(index), n).float())

    def weights(self) -> torch.Tensor:
        if self.kind == "identity":
            return self.onehot
        p = torch.sigmoid(self.logits)
        return p / p.sum()

    def extra_repr(self) -> str:
        return f"skills={self.n}, kind={self.kind}"


class LowRankLinear(WrappedLinear):
    """``base(x) + (alpha / r) * (dropout(x) A^T) B^T`` for the ``(A (r, in), B (out, r))`` a
    subclass's :meth:`factors` gives: one group's LoRA pair (:class:`polytask.heads.
    task_adapters.TaskLoRALinear`) or its mix of the shared skills (:class:`SkillLoRALinear`).
    ``base`` is the shared linear, its parameters left as they are (the caller freezes the
    backbone or not); ``weight`` and ``bias`` are its, so code reading them keeps working.
    Shapes: ``(..., in)`` -> ``(..., out)``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__(base)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        # two thin matmuls, (.., in) -> (.., r) -> (.., out); B A is never materialised
        return self.base(x) + (self.dropout(x) @ a.T) @ b.T * self.scaling


class SkillLoRALinear(LowRankLinear):
    """A linear layer plus its group's combination of the shared skills' LoRA pairs.

    Args:
        base: the (shared) linear layer.
        bank: the slot's skills for this linear (the same object in every group's fork).
        allocation_row: this group's allocation at the slot.
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout on the update's input.
    """

    def __init__(self, base: nn.Linear, bank: SkillBank, allocation_row: Allocation,
                 alpha: float = 16.0, dropout: float = 0.0) -> None:
        if bank.A.shape[2] != base.in_features or bank.B.shape[1] != base.out_features:
            raise ValueError(f"skill bank ({bank.extra_repr()}) does not fit the linear layer "
                             f"(in={base.in_features}, out={base.out_features})")
        if bank.n != allocation_row.n:
            raise ValueError(f"allocation over {allocation_row.n} skills for a bank of {bank.n}")
        super().__init__(base, bank.r, alpha, dropout)
        self.bank, self.allocation = bank, allocation_row

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This group's ``(A (r, in), B (out, r))``."""
        return self.bank.combine(self.allocation.weights())

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}"


def allocation_matrix(allocations: list[Allocation]) -> torch.Tensor:
    """The groups' rows stacked: ``(groups, skills)`` weights, detached (for tables and plots)."""
    with torch.no_grad():
        return torch.stack([a.weights().detach().float() for a in allocations])
