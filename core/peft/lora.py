"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", section 4.1).

A frozen ``W x + b`` becomes ``W x + b + (alpha / r) * B A dropout(x)`` with ``A`` ``(r, in)``
Kaiming-uniform and ``B`` ``(out, r)`` zero, so the adapted layer equals the base layer until
``B`` is trained. ``merge()`` folds ``(alpha / r) B A`` into ``W`` for inference with no extra
cost; ``unmerge()`` takes it out again (both up to floating-point rounding).
:func:`merge_lora` merges every LoRA layer of a model; :func:`unwrap_lora` merges them and puts
the plain ``nn.Linear`` layers back (what ``polytask.experiments.runs.load_run`` does before
evaluation, generation and ONNX export: the exported graphs hold ``W + (alpha / r) B A``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from polytask.core.peft.frozen import FrozenLinear
from polytask.core.peft.modules import replace_module


class LoRALinear(FrozenLinear):
    """A frozen ``nn.Linear`` (``base``) plus a trainable rank-``r`` update.

    Args:
        base: the linear layer to adapt; its parameters are frozen here.
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is multiplied by ``alpha / r`` (Hu et al. 4.1: so
            changing ``r`` needs no retuning of the learning rate).
        dropout: dropout on the update's input only (as in the paper's released code).

    Shapes: ``(..., in_features)`` -> ``(..., out_features)``. ``weight`` is the base weight,
    which includes the update only while merged.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank r ({r}) must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout ({dropout}) must be in [0, 1)")
        super().__init__(base, "LoRA adapts")
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        # The reference implementation's init for A (loralib / PEFT): kaiming_uniform, a=sqrt(5).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, shape ``(out, in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        # Two thin matmuls, (.., in) -> (.., r) -> (.., out); never materialise B A here.
        update = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T
        return out + update * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no-op when already merged)."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again (no-op when not merged)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def merge_lora(model: nn.Module) -> None:
    """Merge every :class:`LoRALinear` in ``model`` (for inference or export)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` (to continue training)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()


def unwrap_lora(model: nn.Module) -> list[str]:
    """Merge every :class:`LoRALinear` and put its (now updated) ``base`` linear back wherever
    the wrapper is held (a multi-task model's task views too), so the model has its original
    module tree and ``state_dict`` keys again: a plain checkpoint, the fused decoding step and
    ONNX export see ordinary ``nn.Linear`` layers. Returns the names of the unwrapped modules."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for _, lora in wrapped:
        lora.merge()
        replace_module(model, lora, lora.base)
    return [name for name, _ in wrapped]
