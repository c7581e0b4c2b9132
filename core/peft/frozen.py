"""``FrozenLinear``: what every PEFT wrapper of an ``nn.Linear`` shares."""
from __future__ import annotations

import torch
from torch import nn


class FrozenLinear(nn.Module):
    """Holds a frozen ``nn.Linear`` as ``base`` next to the wrapper's trainable parts.

    ``weight`` and ``bias`` read the base layer's, so code that inspects a Linear (fused
    projections, interop, parameter counts) keeps working on a wrapped one.
    """

    def __init__(self, base: nn.Linear, what: str) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{what} nn.Linear layers, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias
