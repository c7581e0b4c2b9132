"""Multi-head attention (Vaswani et al. 2017, §3.2.2) with grouped-query heads (Ainslie et al.
2023), self- and cross-attention, and a KV cache for incremental decoding.

    head_i = Attention(x W_q^i, c W_k^g(i), c W_v^g(i)),   out = concat(head_1..h) W_o

where ``c`` is ``x`` for self-attention and the encoder output for cross-attention, and the
key/value head ``g(i) = i // (h / hk)`` is shared by ``h / hk`` query heads.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from polytask.attention.functional import scaled_dot_product_attention
from polytask.attention.kv_cache import KVCache


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(b, i, h·d)`` -> ``(b, h, i, d)`` (einops: ``"b i (h d) -> b h i d"``), a view."""
    b, i = t.shape[0], t.shape[1]   # sizes read from t, so an exported graph keeps them dynamic
    return t.reshape(b, i, n_heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(b, h, i, d)`` -> ``(b, i, h·d)`` (einops: ``"b h i d -> b i (h d)"``)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


class MultiHeadAttention(nn.Module):
    """Args:
        d_model: model width.
        n_heads: query heads ``h``.
        n_kv_heads: key/value heads ``hk`` (``None``: ``h``); must divide ``h``.
        d_head: size of one head (``None``: ``d_model // n_heads``).
        bias: biases in the four projections.
        dropout: dropout on the attention weights (training only).
        scale: score scale (``None``: ``1/sqrt(d_head)``; T5 uses ``1.0``).
        backend: see :func:`attention.scaled_dot_product_attention`.
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 d_head: int | None = None, bias: bool = True, dropout: float = 0.0,
                 scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        from polytask.attention.functional import CHOICES
        if d_model <= 0 or n_heads <= 0:
            raise ValueError(f"d_model ({d_model}) and n_heads ({n_heads}) must be positive")
        if backend not in CHOICES:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(CHOICES)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout ({dropout}) must be in [0, 1)")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
            d_head = d_model // n_heads
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.dropout, self.scale, self.backend = dropout, scale, backend
        self.q_proj = nn.Linear(d_model, n_heads * d_head, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=bias)
        self.out_proj = nn.Linear(n_heads * d_head, d_model, bias=bias)

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        """Queries ``(b, h, i, d)`` of ``x`` ``(b, i, d_model)``."""
        return split_heads(self.q_proj(x), self.n_heads)

    def _kv(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(b, hk, j, d)`` of ``c`` ``(b, j, d_model)``."""
        return split_heads(self.k_proj(c), self.n_kv_heads), split_heads(self.v_proj(c), self.n_kv_heads)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention queries, keys and values of ``x`` ``(b, i, d_model)``."""
        return (self._q(x), *self._kv(x))

    def _out(self, heads: torch.Tensor) -> torch.Tensor:
        """``(b, h, i, d)`` attention output -> ``(b, i, d_model)``."""
        return self.out_proj(merge_heads(heads))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        *,
        position_bias: torch.Tensor | None = None,
        rope: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``(b, i, d_model)`` queries (and keys/values for self-attention).
            context: ``(b, j, d_model)`` keys/values source for cross-attention.
            mask: bool broadcastable to ``(b, h, i, j)``, True = may attend; ``j`` counts the
                cached positions too.
            causal: bottom-right aligned causal mask (exact for cached decoding).
            cache: self-attention appends this step's keys/values; cross-attention computes
                them from ``context`` once and reuses them.
            position_bias: float ``(1|b, h, i, j)`` added to the scores (T5).
            rope: ``rope(x, offset)`` rotates ``(b, h, t, d)`` queries and keys (self-attention).

        Returns ``(b, i, d_model)``.
        """
        offset = cache.length if (cache is not None and context is None) else 0
        if x.shape[1] == 1:
            # One query, diagonal aligned bottom-right: it may see every key, so causal is a
            # no-op; dropping it lets the kernel skip building a mask on every decoding step.
            causal = False
        if context is None:
            q, k, v = self._qkv(x)
            if rope is not None:
                q, k = rope(q, offset), rope(k, offset)
            if cache is not None:
                k, v = cache.update(k, v)
        elif cache is not None and cache.is_set:
            q, k, v = self._q(x), cache.k, cache.v
        else:
            q, (k, v) = self._q(x), self._kv(context)
            if cache is not None:
                cache.set_static(k, v)
        out = scaled_dot_product_attention(
            q, k, v, mask, causal=causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend, bias=position_bias)
        return self._out(out)

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention, backend: str = "auto") -> "MultiHeadAttention":
        """Copy an ``nn.MultiheadAttention``'s weights (same ``embed_dim`` for q, k and v).

        PyTorch packs q, k, v in ``in_proj_weight`` ``(3·d, d)``. Note its boolean masks mean
        True = *not* allowed, the opposite of polytask's; invert them when comparing. The
        returned module is batch-first whatever ``m.batch_first`` says.
        """
        if not m._qkv_same_embed_dim:
            raise ValueError("from_torch needs kdim == vdim == embed_dim")
        if m.bias_k is not None or m.add_zero_attn:
            raise ValueError("from_torch does not support add_bias_kv or add_zero_attn")
        d = m.embed_dim
        has_bias = m.in_proj_bias is not None
        out = cls(d, m.num_heads, bias=has_bias, dropout=m.dropout, backend=backend).to(
            device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype)   # before copying: no rounding
        with torch.no_grad():
            wq, wk, wv = m.in_proj_weight.chunk(3, dim=0)
            for proj, w in ((out.q_proj, wq), (out.k_proj, wk), (out.v_proj, wv)):
                proj.weight.copy_(w)
            out.out_proj.weight.copy_(m.out_proj.weight)
            if has_bias:
                for proj, b in zip((out.q_proj, out.k_proj, out.v_proj), m.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
                out.out_proj.bias.copy_(m.out_proj.bias)
        return out
