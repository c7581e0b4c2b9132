"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
section 2.1 and Figure 2).

An adapter maps a sublayer's output ``h`` ``(..., d)`` to ``h + up(act(down(h)))`` with a
bottleneck ``m << d``. Houlsby et al. place one after the attention output projection and one
after the feed-forward output, before the residual addition; here :class:`AdaptedLinear` wraps
those projections (``out_proj`` and ``wo``), which puts the adapter at exactly that place.

Initialisation: ``down`` near zero (normal, std 1e-3, the paper's "near-identity"
initialisation) and ``up`` exactly zero, so an adapted model starts *equal* to its base model
and ``up`` still receives gradients (``down``'s output is non-zero).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytask.core.peft.frozen import FrozenLinear

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))``: ``(..., d)`` -> ``(..., d)`` through ``(..., bottleneck)``."""

    def __init__(self, d: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        if bottleneck <= 0:
            raise ValueError(f"adapter bottleneck ({bottleneck}) must be positive")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {activation!r}; choices: "
                             f"{', '.join(ACTIVATIONS)}")
        self.down = nn.Linear(d, bottleneck)
        self.up = nn.Linear(bottleneck, d)
        self.act = ACTIVATIONS[activation]
        nn.init.normal_(self.down.weight, std=1e-3)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdaptedLinear(FrozenLinear):
    """A frozen ``nn.Linear`` (``base``) followed by a trainable :class:`BottleneckAdapter`
    (``adapter``): ``adapter(base(x))``, ``(..., in)`` -> ``(..., out)``."""

    def __init__(self, base: nn.Linear, bottleneck: int = 64, activation: str = "gelu") -> None:
        super().__init__(base, "adapters wrap")
        self.adapter = BottleneckAdapter(base.out_features, bottleneck, activation).to(
            device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))
