"""One encoder layer and one decoder layer (Vaswani et al. 2017, Figure 1), pre- or post-norm.

* post-norm (the original Transformer, BART): ``x = norm(x + dropout(sublayer(x)))``;
* pre-norm (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; T5):
  ``x = x + dropout(sublayer(norm(x)))``; the stack then needs a final norm.

The forward signatures take only per-row tensors (``x``, ``memory``, masks ``(b, 1, 1|i, j)``)
and per-stack ones (``position_bias`` ``(1, h, i, j)``, ``rope``), so a caller may route any
subset of rows through any copy of a layer (parameter-sharing plans) and concatenate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from polytask.attention.kv_cache import KVCache
from polytask.attention.multihead import MultiHeadAttention
from polytask.core.model.config import ModelConfig
from polytask.core.model.feedforward import build_feedforward
from polytask.core.model.norms import build_norm

Rope = Callable[[torch.Tensor, int], torch.Tensor]


def build_attention(config: ModelConfig) -> MultiHeadAttention:
    """Multi-head attention as configured. ``scale_attention=False`` gives T5's unscaled
    scores (scale 1.0; T5 folds ``1/sqrt(d)`` into its initialisation instead)."""
    return MultiHeadAttention(
        config.d_model, config.n_heads, n_kv_heads=config.n_kv_heads, d_head=config.d_head,
        bias=config.bias, dropout=config.attention_dropout,
        scale=None if config.scale_attention else 1.0, backend=config.attention_backend)


@dataclass
class LayerCache:
    """The KV caches of one decoder layer: ``self_attn`` grows by one entry per decoded token;
    ``cross_attn`` is filled from the encoder memory on the first step and then reused."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _Residual(nn.Module):
    """Wraps one sublayer with its norm, dropout and residual, pre- or post-norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre = config.norm_position == "pre"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, norm: nn.Module,
                 sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        drop = self.dropout if self.training and self.dropout.p > 0 else _identity
        if self.pre:
            return x + drop(sublayer(norm(x)))
        return norm(x + drop(sublayer(x)))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention, then the feed-forward block; ``(b, s, d)`` -> ``(b, s, d)``.

    Members: ``self_attn``, ``self_attn_norm``, ``ffn``, ``ffn_norm``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = build_attention(config)
        self.self_attn_norm = build_norm(config)
        self.ffn = build_feedforward(config)
        self.ffn_norm = build_norm(config)
        self.residual = _Residual(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        """Args:
            x: ``(b, s, d)``.
            mask: bool ``(b, 1, 1|s, s)``, True = may attend (padding keys False), or None.
            position_bias: float ``(1, h, s, s)`` added to the scores (T5), or None.
            rope: ``rope(x, offset)`` applied to queries and keys (RoPE), or None.
        """
        x = self.residual(x, self.self_attn_norm, lambda h: self.self_attn(
            h, mask=mask, position_bias=position_bias, rope=rope))
        return self.residual(x, self.ffn_norm, self.ffn)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder memory, feed-forward.

    Members: ``self_attn``, ``self_attn_norm``, ``cross_attn``, ``cross_attn_norm``, ``ffn``,
    ``ffn_norm``. Position bias and rope apply to self-attention only (as in T5 and RoFormer).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = build_attention(config)
        self.self_attn_norm = build_norm(config)
        self.cross_attn = build_attention(config)
        self.cross_attn_norm = build_norm(config)
        self.ffn = build_feedforward(config)
        self.ffn_norm = build_norm(config)
        self.residual = _Residual(config)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                self_mask: torch.Tensor | None = None, cross_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, rope: Rope | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """Args:
            x: ``(b, t, d)`` decoder states of the new positions.
            memory: ``(b, s, d)`` encoder output.
            self_mask: bool ``(b, 1, 1|t, L + t)`` over all keys incl. the ``L`` cached ones;
                causality is always added on top (bottom-right aligned).
            cross_mask: bool ``(b, 1, 1|t, s)``, False at padded source positions.
            position_bias: float ``(1, h, t, L + t)``, or None.
            rope: ``rope(x, offset)`` for self-attention, or None.
            cache: this layer's :class:`LayerCache` when decoding incrementally, or None.
        Returns ``(b, t, d)``.
        """
        self_cache = cache.self_attn if cache is not None else None
        cross_cache = cache.cross_attn if cache is not None else None
        x = self.residual(x, self.self_attn_norm, lambda h: self.self_attn(
            h, mask=self_mask, causal=True, cache=self_cache, position_bias=position_bias,
            rope=rope))
        x = self.residual(x, self.cross_attn_norm, lambda h: self.cross_attn(
            h, context=memory, mask=cross_mask, cache=cross_cache))
        return self.residual(x, self.ffn_norm, self.ffn)
