"""Position-wise feed-forward blocks, plain and gated, and ``build_feedforward(config)``.

* Plain (Vaswani et al. 2017, eq. 2): ``wo(dropout(act(wi(x))))`` with act relu, gelu
  (Hendrycks & Gimpel 2016, exact erf form) or gelu_tanh (their tanh approximation).
* Gated linear units (Shazeer 2020, "GLU Variants Improve Transformer", eqs. 5-6):
  ``wo(dropout(act(wi_0(x)) * wi_1(x)))`` — swiglu uses SiLU/Swish, geglu exact GELU,
  geglu_tanh tanh-approximated GELU (T5 v1.1's "gated-gelu").

Module names follow T5 (``wi``/``wo``; gated ``wi_0``/``wi_1``/``wo``) so that
:mod:`polytask.core.interop` maps checkpoints by name. Dropout sits after the activation, as in T5.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polytask.core.model.config import ModelConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
GATED = ("swiglu", "geglu", "geglu_tanh")


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class FeedForward(nn.Module):
    """``wo(dropout(act(wi(x))))``: ``(..., d_model)`` -> ``(..., d_model)`` via ``d_ff``."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", *, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if activation in GATED:
            raise ValueError(f"activation {activation!r} is gated; use GatedFeedForward")
        self.activation = activation
        self.act = _activation(activation)
        self.wi = nn.Linear(d_model, d_ff, bias=bias)
        self.wo = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi(x))))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class GatedFeedForward(nn.Module):
    """``wo(dropout(act(wi_0(x)) * wi_1(x)))`` (Shazeer 2020): ``(..., d_model)`` -> same."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", *, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in GATED:
            raise ValueError(
                f"activation {activation!r} is not gated; choose one of {', '.join(GATED)}")
        self.activation = activation
        self.act = _activation(activation)
        self.wi_0 = nn.Linear(d_model, d_ff, bias=bias)  # the gate, passed through act
        self.wi_1 = nn.Linear(d_model, d_ff, bias=bias)  # the linear value
        self.wo = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def build_feedforward(config: ModelConfig) -> nn.Module:
    """The block named by ``config.activation`` with ``d_model``, ``d_ff``, ``bias``, ``dropout``."""
    _activation(config.activation)
    cls = GatedFeedForward if config.activation in GATED else FeedForward
    return cls(config.d_model, config.d_ff, config.activation, bias=config.bias,
               dropout=config.dropout)


def feedforward_parameters(config: ModelConfig) -> int:
    """Parameters of ``build_feedforward(config)``: ``m·d·d_ff`` weights (m = 2 plain, 3 gated)
    plus, with bias, ``(m - 1)·d_ff + d``."""
    m = 3 if config.activation in GATED else 2
    return m * config.d_model * config.d_ff + config.bias * ((m - 1) * config.d_ff + config.d_model)
