"""The ``sdpa`` backend: PyTorch's fused ``F.scaled_dot_product_attention``, wrapped so that
polytask's conventions hold: boolean mask with True = may attend, causal aligned bottom-right
when ``Lq != Lk``, and zeros (not NaN) for a query row that may attend to nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polytask.attention.masks import combine


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shapes as :func:`polytask.attention.reference.reference_attention`; returns ``(b, h, i, e)``."""
    lq, lk = q.shape[-2], k.shape[-2]
    if mask is None and bias is None:
        # PyTorch's is_causal is top-left aligned; it agrees with ours only when lq == lk.
        if not causal or lq == lk:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    mask = combine(mask, causal, lq, lk, q.device)
    empty = None
    if mask is not None:
        any_key = mask.any(dim=-1, keepdim=True)  # (b|1, h|1, i, 1)
        if not bool(any_key.all()):
            # Let empty rows attend everywhere (finite softmax), then zero their output below.
            empty = ~any_key
            mask = mask | empty
    attn_mask = mask
    if bias is not None:
        attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out
