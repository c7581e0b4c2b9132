"""Normalisation layers: LayerNorm and RMSNorm, and ``build_norm(config)``.

* LayerNorm (Ba, Kiros & Hinton 2016): ``(x - mean(x)) / sqrt(var(x) + eps) * g + b`` over the
  last axis, as in the original Transformer and BART.
* RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"):
  ``x / sqrt(mean(x²) + eps) * g`` — no mean subtraction and no bias. T5 uses it and computes
  the mean square in fp32 even for half-precision inputs; so do we.

Both act on the last axis of any ``(..., d)`` tensor and return the same shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytask.core.model.config import ModelConfig

NORMS = ("layernorm", "rmsnorm")


class LayerNorm(nn.Module):
    """Layer normalisation with a gain ``weight`` (ones) and a shift ``bias`` (zeros), ``(d,)``.

    Same parameters and numbers as ``torch.nn.LayerNorm(d, eps)``; written here so that every
    norm in the model has the same small interface (``weight``, optional ``bias``, ``eps``).
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., d)``."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a gain ``weight`` ``(d,)`` and no bias.

    ``y = x / sqrt(mean(x², -1) + eps) * weight``. As T5's ``T5LayerNorm``, the mean square is
    taken in fp32 (a half-precision sum of squares overflows / loses precision) and the result
    is cast back to the input dtype before the gain is applied.
    """

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., d)``."""
        # fp64 inputs stay fp64; anything narrower is normalised in fp32.
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(compute)
        xc = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xc.to(x.dtype) * self.weight.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(config: ModelConfig) -> nn.Module:
    """The norm named by ``config.norm`` over ``config.d_model`` with ``config.norm_eps``."""
    if config.norm == "layernorm":
        return LayerNorm(config.d_model, config.norm_eps)
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    raise ValueError(f"unknown norm {config.norm!r}; choose one of {', '.join(NORMS)}")


def norm_parameters(config: ModelConfig) -> int:
    """Parameter count of one ``build_norm(config)``: ``2d`` for LayerNorm, ``d`` for RMSNorm."""
    return 2 * config.d_model if config.norm == "layernorm" else config.d_model
