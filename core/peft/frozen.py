"""``WrappedLinear``: a module that holds an ``nn.Linear`` as ``base`` and reads as it, and
``FrozenLinear``: what every PEFT wrapper of an ``nn.Linear`` shares (the base frozen)."""
from __future__ import annotations

import torch
from torch import nn


class WrappedLinear(nn.Module):
    """Holds an ``nn.Linear`` as ``base`` next to a wrapper's own parts.

    ``weight`` and ``bias`` read the base layer's, so code that inspects a Linear (fused
    projections, interop, parameter counts) keeps working on a wrapped one.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


class FrozenLinear(WrappedLinear):
    """A :class:`WrappedLinear` whose base is frozen: the PEFT wrappers' common part."""

    def __init__(self, base: nn.Linear, what: str) -> None:
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{what} nn.Linear layers, got {type(base).__name__}")
        super().__init__(base)
        for p in base.parameters():
            p.requires_grad_(False)
