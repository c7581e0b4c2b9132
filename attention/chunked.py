"""The ``chunked`` backend: exact attention with an online softmax over key blocks.

The reference backend stores the ``(b, h, i, j)`` weights, so its memory grows with ``Lq·Lk``.
Here the keys are visited one block of ``block_size`` columns at a time and only the running
statistics of each query row are kept (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"; Rabe & Staats 2021; Dao et al. 2022, FlashAttention, Alg. 1)::

    m_i  <- max(m_i, max_j s_ij)                       running row maximum
    l_i  <- l_i · exp(m_old - m_i) + Σ_j exp(s_ij - m_i)   running normaliser
    acc_i <- acc_i · exp(m_old - m_i) + Σ_j exp(s_ij - m_i) v_j
    out_i = acc_i / l_i,      lse_i = m_i + log l_i

Memory is ``O(Lq · block_size)`` for the scores of one block, linear in length.

The backward pass (Dao 2023, FlashAttention-2, Alg. 2) does not store the weights either: it
recomputes each block's probabilities from the saved log-sum-exp, ``p_ij = exp(s_ij - lse_i)``,
and uses ``Δ_i = Σ_e dO_ie · O_ie`` so that ``ds_ij = p_ij (dp_ij - Δ_i)`` needs no row sums
over blocks it has not seen.

Because the loop runs over key blocks and each block touches only the query rows that can see
it, the causal mask lets a key block skip every query row above the diagonal (query ``i`` sees
key ``j`` iff ``j <= i + Lk - Lq``): the part of the score matrix the mask hides is never
computed, and causal attention costs about half the work.

Dropout is not supported (it would need the same random mask regenerated in the backward);
asking for it raises ``ValueError``.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange

DEFAULT_BLOCK = 64  # key columns per step: at L=1024 peak memory 1.16x sdpa (128: 1.49x), see
                   # ``python -m polytask.experiments.bench.attention --block-size 32 64 128``


def _as_4d(t: torch.Tensor | None, lq: int, lk: int) -> torch.Tensor | None:
    """Left-pad a broadcastable mask/bias to 4 dims and expand (as a view) its last two dims."""
    if t is None:
        return None
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.expand(t.shape[0], t.shape[1], lq, lk)


def _blocks(lq: int, lk: int, causal: bool, block: int):
    """Yield ``(i0, j0, j1)``: key block ``j0:j1`` and the first query row that can see it.

    Causal: query ``i`` sees key ``j0`` iff ``i >= j0 - (lk - lq)``; since ``j0 < lk`` the last
    query row always sees every block, so each block is visited (only its rows are trimmed).
    """
    offset = lk - lq
    for j0 in range(0, lk, block):
        i0 = max(0, j0 - offset) if causal else 0
        yield i0, j0, min(j0 + block, lk)


class _Scratch:
    """One reusable buffer for the ``(n, rows, cols)`` tiles of the block loop.

    A fresh tile per step would be a fresh allocation of up to ``n · Lq · block`` floats; above
    glibc's mmap threshold (32 MiB) every such allocation is new, page-faulting memory, which
    measured ~2× slower matmuls on this CPU. Reusing one buffer avoids that.
    """

    def __init__(self, like: torch.Tensor, numel: int) -> None:
        self.buf = like.new_empty(numel)

    def take(self, *shape: int) -> torch.Tensor:
        return self.buf[: math.prod(shape)].view(shape)


def _scores(out: torch.Tensor, q: torch.Tensor, k_blk: torch.Tensor, scale: float,
            mask4: torch.Tensor | None, bias4: torch.Tensor | None, heads: int, causal: bool,
            offset: int, i0: int, j0: int, j1: int) -> torch.Tensor:
    """Write the masked scores of query rows ``i0:`` against keys ``j0:j1`` into ``out``.

    ``q`` is ``(n, i, d)`` and ``out`` ``(n, rows, cols)`` with ``n = b·h``; masked entries
    become ``-inf``. The scale rides on the matmul (BLAS ``alpha``) instead of a separate pass.
    """
    out.baddbmm_(q[:, i0:], k_blk.transpose(1, 2), beta=0.0, alpha=scale)
    s4 = out.view(-1, heads, *out.shape[1:])  # (b, h, rows, cols) view for broadcasting
    if bias4 is not None:
        s4 += bias4[:, :, i0:, j0:j1]
    if mask4 is not None:
        s4.masked_fill_(~mask4[:, :, i0:, j0:j1], float("-inf"))
    # Only rows above the diagonal that crosses this tile need the causal mask.
    last = min(out.shape[1], j1 - 1 - offset - i0)  # rows i0 .. i0+last-1 miss some keys
    if causal and last > 0:
        i = torch.arange(i0, i0 + last, device=out.device)[:, None]
        j = torch.arange(j0, j1, device=out.device)[None, :]
        out[:, :last].masked_fill_(j > i + offset, float("-inf"))
    return out


class _ChunkedAttention(torch.autograd.Function):
    """Forward: online softmax over key blocks. Backward: recompute from the log-sum-exp.

    Works on ``(n, length, dim)`` tensors with ``n = b·h``; ``mask4``/``bias4`` stay 4-d views.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask4, bias4, heads: int, causal: bool, scale: float, block: int):
        n, lq, _ = q.shape
        lk, e = k.shape[1], v.shape[2]
        offset = lk - lq
        m = q.new_full((n, lq), float("-inf"))  # running row maximum
        l = q.new_zeros((n, lq))                # running normaliser
        acc = q.new_zeros((n, lq, e))           # running unnormalised output
        scratch, pv_scratch = _Scratch(q, n * lq * min(block, lk)), _Scratch(q, n * lq * e)
        for i0, j0, j1 in _blocks(lq, lk, causal, block):
            s = _scores(scratch.take(n, lq - i0, j1 - j0), q, k[:, j0:j1], scale, mask4, bias4,
                        heads, causal, offset, i0, j0, j1)
            m_old = m[:, i0:]
            # A row that has seen only masked keys has max -inf; clamping it to the most
            # negative finite number keeps exp(-inf - m) = 0 rather than NaN.
            m_new = torch.maximum(m_old, s.amax(dim=-1)).clamp_(min=torch.finfo(q.dtype).min)
            p = s.sub_(m_new[..., None]).exp_()
            alpha = torch.exp(m_old - m_new)  # rescales what was accumulated under m_old
            l[:, i0:].mul_(alpha).add_(p.sum(dim=-1))
            # One batched matmul into a contiguous buffer: baddbmm_ on the strided acc[:, i0:]
            # would run as n small matmuls, each a parallel region of its own.
            pv = torch.bmm(p, v[:, j0:j1], out=pv_scratch.take(n, lq - i0, e))
            acc[:, i0:].mul_(alpha[..., None]).add_(pv)
            m[:, i0:] = m_new
        empty = l == 0  # rows that may attend to nothing: output zeros, never NaN
        out = acc.div_(torch.where(empty, 1.0, l)[..., None])
        # lse = +inf for empty rows makes the backward's exp(s - lse) exactly 0 there.
        lse = torch.where(empty, float("inf"), m + torch.log(l))
        ctx.save_for_backward(q, k, v, out, lse, mask4, bias4)
        ctx.heads, ctx.causal, ctx.scale, ctx.block = heads, causal, scale, block
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, mask4, bias4 = ctx.saved_tensors
        heads, causal, scale, block = ctx.heads, ctx.causal, ctx.scale, ctx.block
        n, lq, _ = q.shape
        lk = k.shape[1]
        offset = lk - lq
        d_out = d_out.to(out.dtype).contiguous()
        delta = (d_out * out).sum(dim=-1)  # Δ_i = Σ_e dO_ie O_ie = Σ_j p_ij dp_ij
        # Every key block is visited (see _blocks), so dk and dv need no zero fill.
        dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
        want_bias = bias4 is not None and ctx.needs_input_grad[4]
        if want_bias:
            # Accumulated at the bias' own batch/head shape; autograd reduces the expanded (i, j).
            dbias = bias4.new_zeros(bias4.shape)
            reduce_dims = [d for d in (0, 1) if bias4.shape[d] == 1]
        d = q.shape[2]
        cols = min(block, lk)
        # The scores buffer is reused for the (n, rows, d) dq product once p is consumed.
        s_scratch, dp_scratch = _Scratch(q, n * lq * max(cols, d)), _Scratch(q, n * lq * cols)
        for i0, j0, j1 in _blocks(lq, lk, causal, block):
            k_blk, v_blk, do = k[:, j0:j1], v[:, j0:j1], d_out[:, i0:]
            shape = (n, lq - i0, j1 - j0)
            s = _scores(s_scratch.take(*shape), q, k_blk, scale, mask4, bias4, heads, causal,
                        offset, i0, j0, j1)
            p = s.sub_(lse[:, i0:, None]).exp_()             # recomputed probabilities
            dv[:, j0:j1] = torch.bmm(p.transpose(1, 2), do)
            dp = torch.bmm(do, v_blk.transpose(1, 2), out=dp_scratch.take(*shape))
            ds = dp.sub_(delta[:, i0:, None]).mul_(p)        # softmax backward, in place
            if want_bias:
                ds4 = ds.view(-1, heads, *shape[1:])
                if reduce_dims:  # the bias broadcasts over batch and/or heads: sum those
                    ds4 = ds4.sum(dim=reduce_dims, keepdim=True)
                dbias[:, :, i0:, j0:j1] += ds4
            dk[:, j0:j1] = torch.bmm(ds.transpose(1, 2), q[:, i0:])
            dq[:, i0:] += torch.bmm(ds, k_blk, out=s_scratch.take(n, lq - i0, d))
        # s = scale · q kᵀ, so dq and dk carry the scale once.
        dq.mul_(scale)
        dk.mul_(scale)
        return dq, dk, dv, None, dbias if want_bias else None, None, None, None, None


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Exact attention with memory linear in length; same contract as the reference backend.

    Args:
        q: ``(b, h, i, d)``; k: ``(b, h, j, d)``; v: ``(b, h, j, e)`` (heads already expanded
            for grouped-query attention by
            :func:`polytask.attention.functional.scaled_dot_product_attention`).
        mask: bool, broadcastable to ``(b, h, i, j)``, True = may attend.
        causal: query ``i`` sees keys ``j <= i + Lk - Lq`` (bottom-right aligned).
        scale: multiplies ``q kᵀ``.
        dropout_p: must be 0 (see the module docstring).
        bias: float, broadcastable to ``(b, h, i, j)``, added to the scores; differentiable.
        block_size: key columns per step; memory is ``O(b · h · i · block_size)``.

    Returns:
        ``(b, h, i, e)`` in q's dtype; rows that may attend to nothing are zero.
        fp16/bf16 inputs are computed in fp32.
    """
    if dropout_p != 0.0:
        raise ValueError(
            f"the chunked backend does not support dropout (dropout_p={dropout_p}); use "
            "backend 'reference' or 'sdpa' for attention dropout")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    lq, lk = q.shape[2], k.shape[2]
    mask4 = _as_4d(mask, lq, lk)
    bias4 = _as_4d(None if bias is None else bias.to(work), lq, lk)
    b, h = q.shape[:2]
    q3, k3, v3 = (rearrange(t.to(work), "b h l d -> (b h) l d").contiguous() for t in (q, k, v))
    out = _ChunkedAttention.apply(q3, k3, v3, mask4, bias4, h, causal, float(scale), block_size)
    return rearrange(out, "(b h) i e -> b h i e", b=b).to(dtype)
