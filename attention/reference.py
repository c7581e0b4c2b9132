"""The reference backend: attention exactly as written in the paper, weights materialised.

    Attention(Q, K, V) = softmax(Q Kᵀ · scale + bias, masked) V        (Vaswani et al. 2017, eq. 1)

Memory is quadratic in length because the ``(b, h, i, j)`` weights are stored; use it to learn,
to plot attention maps (``return_weights=True``) and as the oracle the fast backends are
tested against.
"""
from __future__ import annotations

import torch
from einops import einsum

from polytask.attention.masks import combine


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Args: q ``(b, h, i, d)``, k ``(b, h, j, d)``, v ``(b, h, j, e)``; mask bool broadcastable
    to ``(b, h, i, j)`` (True = may attend); bias float broadcastable to ``(b, h, i, j)``.

    Returns ``(b, h, i, e)``, and the ``(b, h, i, j)`` weights if ``return_weights``.
    Rows that may attend to nothing get all-zero weights and a zero output.
    """
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * scale
    if bias is not None:
        scores = scores + bias
    mask = combine(mask, causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        # A fully masked row would be softmax(-inf, ..., -inf) = NaN; give it zero weights instead.
        any_key = mask.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~any_key, 0.0)
    # Half-precision scores are normalised in fp32 for stability; fp32/fp64 stay as they are.
    low = scores.dtype in (torch.float16, torch.bfloat16)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32 if low else None).to(q.dtype)
    if mask is not None:
        weights = weights.masked_fill(~any_key, 0.0)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    out = einsum(weights, v, "b h i j, b h j e -> b h i e")
    return (out, weights) if return_weights else out
