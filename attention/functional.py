"""``scaled_dot_product_attention``: one function, several interchangeable backends.

The backend is always an explicit argument (``"auto"`` picks by a documented rule, never by
what happens to be installed). Every backend obeys the same contract, tested against each other
and against PyTorch:

* q ``(b, h, i, d)``, k ``(b, hk, j, d)``, v ``(b, hk, j, e)``; ``h`` must be a multiple of
  ``hk`` (grouped-query attention: each key/value head serves ``h // hk`` query heads).
* ``mask``: bool, broadcastable to ``(b, h, i, j)``, True = may attend.
* ``causal``: query ``i`` sees keys ``j <= i + Lk - Lq`` (bottom-right aligned).
* ``bias``: optional float additive score bias broadcastable to ``(b, h, i, j)`` (e.g. T5's
  relative position bias); differentiable.
* A query row that may attend to nothing returns zeros, never NaN.
* ``scale`` defaults to ``1/sqrt(d)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from einops import repeat

from polytask.attention.chunked import chunked_attention
from polytask.attention.reference import reference_attention
from polytask.attention.sdpa import sdpa_attention

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference_attention,
    "chunked": chunked_attention,
    "sdpa": sdpa_attention,
}
CHOICES = ("auto", "reference", "chunked", "sdpa", "triton")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           bias: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-d (batch, heads, length, dim); got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}")
    (b, h, _, d), (bk, hk, lk, dk), (bv, hv, lv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {bv}")
    if d != dk:
        raise ValueError(f"q head size ({d}) must equal k head size ({dk})")
    if hk != hv or lk != lv:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in heads and length")
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    target = (b, h, q.shape[2], lk)
    for name, t in (("mask", mask), ("bias", bias)):
        if t is None:
            continue
        if name == "mask" and t.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = may attend), got {t.dtype}")
        if not _broadcasts(tuple(t.shape), target):
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast to (b, h, Lq, Lk) = {target}")


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """True when ``shape`` broadcasts to ``target`` (numpy rules; a plain-Python check, as
    ``torch.broadcast_shapes`` costs ~0.1 ms a call and this runs in every attention call)."""
    return len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def expand_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(b, hk, j, d)`` -> ``(b, n_heads, j, d)`` by repeating each key/value head."""
    if x.shape[1] == n_heads:
        return x
    return repeat(x, "b hk j d -> b (hk g) j d", g=n_heads // x.shape[1])


def resolve_backend(backend: str, q: torch.Tensor, *, k: torch.Tensor | None = None,
                    v: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    causal: bool = False, dropout_p: float = 0.0,
                    bias: torch.Tensor | None = None) -> str:
    """Turn ``"auto"`` into a concrete backend for these arguments.

    The rule (measured with ``polytask bench attention``; see docs/benchmarks.md):

    * CUDA tensors, and the Triton kernel can run these arguments
      (:func:`polytask.attention.triton_flash.unsupported_reason` is None): ``triton``;
    * otherwise ``sdpa``: PyTorch's fused kernel, which on this project's reference CPU is the
      fastest at every length (the hand-written ``chunked`` backend reaches 0.8-1.1x of it
      with ~1.2x its memory, and ``reference`` materialises the weights). ``sdpa`` supports
      every argument (masks, bias, dropout), so ``auto`` never fails for lack of support.
    """
    if backend not in CHOICES:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(CHOICES)}")
    if backend != "auto":
        return backend
    if q.is_cuda and k is not None and v is not None:
        try:
            from polytask.attention.triton_flash import unsupported_reason
        except ImportError:  # the optional extra is not installed
            return "sdpa"
        if unsupported_reason(q, k, v, mask, causal=causal, dropout_p=dropout_p, bias=bias) is None:
            return "triton"
    return "sdpa"


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q kᵀ · scale + bias) v`` -> ``(b, h, i, e)``.

    See the module docstring for shapes and conventions. Raises ``ValueError`` for an unknown
    backend, inconsistent shapes, or a combination the chosen backend cannot do.
    """
    _check(q, k, v, mask, bias)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    name = resolve_backend(backend, q, k=k, v=v, mask=mask, causal=causal, dropout_p=dropout_p,
                           bias=bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    h = q.shape[1]
    if name != "triton":  # the Triton kernel handles grouped heads itself
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
    return BACKENDS[name](q, k, v, mask, causal=causal, scale=scale, dropout_p=dropout_p, bias=bias)


def _triton_backend(q, k, v, mask=None, **kw):
    # Optional dependency: imported only when the triton backend is requested.
    from polytask.attention.triton_flash import triton_attention
    return triton_attention(q, k, v, mask, **kw)


BACKENDS["triton"] = _triton_backend
