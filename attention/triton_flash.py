"""The optional ``"triton"`` backend: fused flash attention, forward and backward.

How the kernels work (tiling, online softmax, recomputing ``P`` from the log-sum-exp) is
explained in :mod:`polytask.attention.triton_kernels`. This module is the PyTorch side: it checks what
the kernels can do (:func:`unsupported_reason`), launches them, and wraps them in a
``torch.autograd.Function`` so that ``loss.backward()`` runs the fused backward.

Memory: the forward saves q, k, v, the output and one fp32 log-sum-exp per query row, i.e.
O(b·h·L·d) — never the O(b·h·L²) weights the reference backend keeps.

Triton is optional: importing this module never imports triton; the kernels are imported on
first use. On a CPU the kernels run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before* the kernels are imported (the tests do this); it is slow and
meant for checking correctness on tiny shapes.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch

MIN_HEAD, MAX_HEAD = 16, 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Fixed tiles and pipeline depth: @triton.autotune needs a GPU to time its candidates, and none
# was available when this was written, so these are conservative, untuned choices that fit the
# shared memory (~100 KB) of consumer GPUs; tune them with experiments/bench/triton_gpu.py.
NUM_WARPS, NUM_STAGES = 4, 2


def default_tiles(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(block_m, block_n)``: 64x64 for 16-bit heads up to 64 wide, else 64x32 (wider rows)."""
    return (64, 64) if d <= 64 and dtype != torch.float32 else (64, 32)


def _interpreting() -> bool:
    """True if the kernels are (or, once imported, will be) run by Triton's CPU interpreter."""
    loaded = sys.modules.get("polytask.attention.triton_kernels")
    if loaded is not None:  # the decision was taken when the kernels were decorated
        return type(loaded.flash_fwd_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _key_mask(mask: torch.Tensor, b: int, lk: int) -> torch.Tensor | None:
    """Bool mask broadcastable as ``(b, 1, 1, j)`` -> ``(b, j)`` int8; ``None`` if it is not."""
    if mask.dim() > 4:
        return None
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, b) or shape[3] not in (1, lk):
        return None
    return mask.reshape(shape[0], shape[3]).expand(b, lk).to(torch.int8).contiguous()


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None, *, causal: bool = False,
                       dropout_p: float = 0.0, bias: torch.Tensor | None = None) -> str | None:
    """Why the Triton kernels cannot run these arguments, or ``None`` if they can.

    Shapes as in :mod:`polytask.attention.functional`: q ``(b, h, i, d)``, k/v ``(b, hk, j, d)`` with
    ``h % hk == 0``; ``mask`` must be a per-example key mask, broadcastable as ``(b, 1, 1, j)``.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install polytask[triton])"
    if not (q.device == k.device == v.device):
        return f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    if q.device.type == "cpu" and not _interpreting():
        return ("tensors are on the CPU and Triton's interpreter is off: set TRITON_INTERPRET=1 "
                "before triton kernels are imported, or use a CUDA device")
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device} is not supported (cuda, or cpu with TRITON_INTERPRET=1)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-d, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"dtypes must match and be fp16, bf16 or fp32, got {q.dtype}, {k.dtype}, {v.dtype}"
    (b, h, _, d), (_, hk, lk, _) = q.shape, k.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        return f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if v.shape[-1] != d:
        return f"value head size ({v.shape[-1]}) must equal the query head size ({d})"
    if not MIN_HEAD <= d <= MAX_HEAD:
        return f"head size {d} is outside {MIN_HEAD}-{MAX_HEAD}"
    if h % hk:
        return f"query heads ({h}) must be a multiple of key/value heads ({hk})"
    if max(q.numel(), k.numel()) >= 2**31:
        return "tensors of 2**31 elements or more overflow the kernels' int32 offsets"
    if dropout_p != 0.0:
        return f"dropout is not implemented in the Triton kernel (dropout_p={dropout_p})"
    if bias is not None:
        return "an additive float bias is not implemented in the Triton kernel"
    if mask is not None:
        if mask.dtype != torch.bool:
            return f"mask must be bool (True = may attend), got {mask.dtype}"
        if _key_mask(mask, b, lk) is None:
            return (f"mask of shape {tuple(mask.shape)} is not a key mask broadcastable as "
                    f"(b, 1, 1, j) = ({b}, 1, 1, {lk}); dense masks are not supported "
                    "(use causal=True for causal masking)")
    return None


def _cdiv(n: int, block: int) -> int:
    """Number of tiles of ``block`` rows that cover ``n`` rows."""
    return (n + block - 1) // block


def _flags(q: torch.Tensor, key_mask: torch.Tensor | None, causal: bool, block_m: int,
           block_n: int) -> dict:
    """Compile-time switches and launch options shared by the attention kernels."""
    return dict(HAS_MASK=key_mask is not None, CAUSAL=causal, UPCAST=_interpreting(),
                IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=_block_d(q.shape[-1]), num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _block_d(d: int) -> int:
    """Head dim padded to a power of two (tl.arange needs one); at least 16 for tl.dot."""
    return max(16, 1 << (d - 1).bit_length())


class FlashAttention(torch.autograd.Function):
    """``softmax(q kᵀ · scale) v`` with fused Triton forward and backward.

    forward(q ``(b, h, i, d)``, k ``(b, hk, j, d)``, v ``(b, hk, j, d)``, key_mask ``(b, j)``
    int8 or None, causal, scale, block_m, block_n) -> ``(b, h, i, d)`` in q's dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal: bool, scale: float, block_m: int, block_n: int):
        from polytask.attention.triton_kernels import flash_fwd_kernel
        (b, h, lq, d), (_, hk, lk, _) = q.shape, k.shape
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(b * h, lq, device=q.device, dtype=torch.float32)
        km = key_mask if key_mask is not None else q  # a dummy pointer the kernel never reads
        mstride = key_mask.stride() if key_mask is not None else (0, 0)
        flash_fwd_kernel[(_cdiv(lq, block_m), b * h)](
            q, k, v, km, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *mstride,
            h, h // hk, lq, lk, d, scale, **_flags(q, key_mask, causal, block_m, block_n))
        ctx.save_for_backward(q, k, v, key_mask, o, lse)
        ctx.args = (causal, scale, block_m, block_n)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' backward is not differentiable
    def backward(ctx, do):
        from polytask.attention.triton_kernels import (flash_bwd_delta_kernel, flash_bwd_dkdv_kernel,
                                              flash_bwd_dq_kernel)
        q, k, v, key_mask, o, lse = ctx.saved_tensors
        causal, scale, block_m, block_n = ctx.args
        (b, h, lq, d), (_, hk, lk, _) = q.shape, k.shape
        km = key_mask if key_mask is not None else q
        mstride = key_mask.stride() if key_mask is not None else (0, 0)
        flags = _flags(q, key_mask, causal, block_m, block_n)

        delta = torch.empty_like(lse)
        flash_bwd_delta_kernel[(_cdiv(lq, block_m), b * h)](
            o, do, delta, *o.stride(), *do.stride(), h, lq, d,
            BLOCK_M=block_m, BLOCK_D=flags["BLOCK_D"], num_warps=NUM_WARPS)
        dk = torch.empty(b, hk, lk, d, device=k.device, dtype=k.dtype)
        dv = torch.empty(b, hk, lk, d, device=v.device, dtype=v.dtype)
        flash_bwd_dkdv_kernel[(_cdiv(lk, block_n), b * hk)](
            q, k, v, km, do, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *mstride,
            h, hk, h // hk, lq, lk, d, scale, **flags)
        dq = torch.empty(b, h, lq, d, device=q.device, dtype=q.dtype)
        flash_bwd_dq_kernel[(_cdiv(lq, block_m), b * h)](
            q, k, v, km, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *mstride,
            h, h // hk, lq, lk, d, scale, **flags)
        return dq, dk, dv, None, None, None, None, None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Flash attention in Triton; the ``"triton"`` backend of ``scaled_dot_product_attention``.

    Args: q ``(b, h, i, d)``; k, v ``(b, hk, j, d)`` with ``h % hk == 0`` (not expanded: query
    head ``h`` uses key/value head ``h // (h // hk)``); ``mask`` bool broadcastable as
    ``(b, 1, 1, j)``, True = may attend (build one with ``polytask.attention.masks.key_padding_mask`` or
    ``lengths_to_mask``); causal is bottom-right aligned. ``block_m``/``block_n`` are the tile
    sizes (powers of two >= 16, default :func:`default_tiles`; tests use 16 to cross several
    tiles on tiny shapes). fp32 inputs use true fp32 matmuls (no TF32); fp16/bf16 accumulate
    in fp32 and return the input dtype.

    Returns ``(b, h, i, d)`` in q's dtype; rows that may attend to nothing are 0.
    Raises ``ValueError`` with :func:`unsupported_reason` when the kernel cannot run these.
    """
    reason = unsupported_reason(q, k, v, mask, causal=causal, dropout_p=dropout_p, bias=bias)
    if reason is not None:
        raise ValueError(f"triton attention backend: {reason}")
    tiles = default_tiles(q.shape[-1], q.dtype)
    block_m, block_n = block_m or tiles[0], block_n or tiles[1]
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_mask = None if mask is None else _key_mask(mask, q.shape[0], k.shape[2])
    return FlashAttention.apply(q, k, v, key_mask, bool(causal), scale, block_m, block_n)
