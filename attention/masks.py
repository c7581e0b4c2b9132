"""Boolean attention masks. Convention everywhere in polytask: **True = may attend**.

Shapes follow the project glossary: b batch, h heads, i query positions, j key positions.
A mask is broadcastable to ``(b, h, i, j)``.
"""
from __future__ import annotations

import torch


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask of shape ``(lq, lk)``.

    Query ``i`` may attend to key ``j`` iff ``j <= i + lk - lq``. With ``lq == lk`` this is the
    usual lower triangle; with ``lq < lk`` (decoding with a KV cache, where the queries are the
    last ``lq`` positions of a length-``lk`` sequence) the diagonal is aligned to the last key.
    """
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def key_padding_mask(is_token: torch.Tensor) -> torch.Tensor:
    """``(b, j)`` booleans (True = real token) -> ``(b, 1, 1, j)`` attention mask."""
    if is_token.dtype != torch.bool or is_token.dim() != 2:
        raise ValueError(
            f"key padding mask must be a (batch, length) bool tensor, got dtype {is_token.dtype} "
            f"and shape {tuple(is_token.shape)}"
        )
    return is_token[:, None, None, :]


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(b,)`` integer lengths -> ``(b, max_len)`` booleans, True for positions < length."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def combine(mask: torch.Tensor | None, causal: bool, lq: int, lk: int,
            device: torch.device) -> torch.Tensor | None:
    """AND a user mask with the causal mask; ``None`` when nothing is masked."""
    if not causal:
        return mask
    c = causal_mask(lq, lk, device)
    return c if mask is None else (mask & c)
