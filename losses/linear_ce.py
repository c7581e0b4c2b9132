"""LM head + cross-entropy in one pass over row chunks, never holding the full logits.

    linear_cross_entropy(h, W, b, y, token_weight, smoothing=eps)
        == (token_weight * smoothed_nll(F.linear(h, W, b), y, smoothing=eps)).sum()

The obvious twin (right-hand side) materialises the ``(N, V)`` logits, a ``(N, V)``
log-softmax, and in backward two more ``(N, V)`` gradients; at N = 2048 target tokens and a
vocabulary of 8000 that is four 65 MB tensors per step, each freshly allocated (and, above
glibc's mmap threshold, page-faulted) and each streamed through memory several times. Here the
rows are processed ``chunk`` at a time: a chunk's logits ``z`` (``chunk × V``, 16 MB by default,
one buffer size reused from chunk to chunk) give the loss, and — when gradients are wanted — are turned *in place* into the
gradient of the loss w.r.t. the logits,

    dL/dz_c = w · (softmax(z)_c - (1 - eps)·[c == y] - eps / V),

which is immediately multiplied into the gradients of ``h`` (``dz W``), ``W`` (``dzᵀ h``) and
``b`` (``Σ dz``). Those are kept for backward, which only scales them by the incoming gradient.
The matmul FLOPs are the same as the twin's (one forward and two backward GEMMs); what is saved
is the memory traffic and the allocations. The chunks' forward GEMMs go through
:func:`polytask.attention.packed.reusable_linear` (oneDNN, with ``W`` packed once per call: on the
benchmark machine a ``(524, 256) x (256, 8000)`` chunk took 11 ms against MKL's 20 ms). Rows whose target is ``ignore_index`` (padding) are
dropped before the GEMMs, which the twin cannot do.

The same technique is used by Liger-Kernel's ``FusedLinearCrossEntropy`` and by Apple's
"Cut Your Losses" (Wijmans et al. 2024); this is a plain PyTorch version of the idea.

Limits: first derivatives only (``once_differentiable``); under autocast, or for a head that is
not a plain ``nn.Linear``, :class:`losses.GenerativeLoss` uses the twin instead.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from polytask.attention.packed import reusable_linear
from polytask.core.data.batch import IGNORE_INDEX

#: rows per chunk are chosen so that one chunk of logits holds about this many elements (4 Mi
#: floats = 16 MB in fp32). Measured on a (2048, 256) x 8000 head, forward + backward, 2 threads:
#: 128-row chunks ~250 ms, 256 to 2048 rows 195-240 ms (flat within noise), the twin 275-290 ms.
CHUNK_ELEMENTS = 1 << 22


def default_chunk(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab`` entries (at least 16)."""
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


def _chunks(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
            token_weight: Tensor, smoothing: float, chunk: int,
            need: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor | None, Tensor | None,
                                                    Tensor | None]:
    """The loss and (for the inputs flagged in ``need``: hidden, weight, bias) its gradients."""
    n, vocab = hidden.shape[0], weight.shape[0]
    total = hidden.new_zeros(())
    grad_h = torch.empty_like(hidden) if need[0] else None
    grad_w = torch.zeros_like(weight) if need[1] else None
    grad_b = torch.zeros_like(bias) if (bias is not None and need[2]) else None
    any_grad = any(need)
    head = reusable_linear(weight, bias)                            # packed once for oneDNN
    for start in range(0, n, chunk):
        h = hidden[start:start + chunk]
        y = target[start:start + chunk, None]                       # (c, 1)
        w = token_weight[start:start + chunk]                       # (c,)
        z = head(h)                                                 # (c, V)
        # -log q(y) smoothed = lse - (1 - eps) z_y - eps * mean_c z_c   (PyTorch's convention)
        loss = -(1.0 - smoothing) * z.gather(1, y)[:, 0]
        if smoothing:
            loss = loss - smoothing * z.mean(dim=-1)
        # log-sum-exp and softmax in place on z: no (c, V) temporaries
        top = z.amax(dim=-1, keepdim=True)
        total_exp = z.sub_(top).exp_().sum(dim=-1, keepdim=True)
        loss = loss + (top + total_exp.log())[:, 0]
        total = total + (w * loss).sum()
        if not any_grad:
            continue
        dz = z.div_(total_exp)                                      # softmax
        if smoothing:
            dz.sub_(smoothing / vocab)
        dz.scatter_add_(1, y, dz.new_full(y.shape, smoothing - 1.0))
        dz.mul_(w[:, None])                                         # dL/dz, (c, V)
        if grad_h is not None:
            torch.mm(dz, weight, out=grad_h[start:start + chunk])
        if grad_w is not None:
            grad_w.addmm_(dz.t(), h)
        if grad_b is not None:
            grad_b.add_(dz.sum(dim=0))
    return total, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, smoothing, chunk):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        total, grad_h, grad_w, grad_b = _chunks(hidden, weight, bias, target, token_weight,
                                                smoothing, chunk, need)
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grads = [None if g is None else g * grad_total for g in ctx.grads]
        return (*grads, None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                         token_weight: Tensor, *, smoothing: float = 0.0,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> Tensor:
    """``sum_i token_weight_i * CE(hidden_i Wᵀ + b, target_i)`` without the full logits.

    Args:
        hidden: ``(..., d)`` inputs of the LM head.
        weight: ``(V, d)``; bias: ``(V,)`` or None.
        target: ``(...)`` long token ids; ``ignore_index`` marks rows without a target.
        token_weight: ``(...)`` float weight of each row's loss (e.g. ``1 / n_tokens`` for a
            token mean); ignored rows contribute nothing whatever their weight.
        smoothing: label smoothing eps in [0, 1) (PyTorch's convention, see
            :mod:`polytask.losses.cross_entropy`).
        chunk: rows per chunk (default :func:`default_chunk`).
    Returns the scalar weighted sum; differentiable w.r.t. hidden, weight and bias.
    """
    d = weight.shape[1]
    if hidden.shape[-1] != d or target.shape != hidden.shape[:-1] or token_weight.shape != target.shape:
        raise ValueError(f"linear_cross_entropy expects hidden (..., {d}), target and token_weight "
                         f"(...) of the same leading shape; got {tuple(hidden.shape)}, "
                         f"{tuple(target.shape)}, {tuple(token_weight.shape)}")
    hidden, target, token_weight = hidden.reshape(-1, d), target.reshape(-1), token_weight.reshape(-1)
    vocab = weight.shape[0]
    keep = target != ignore_index
    bad = keep & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(f"target values {target[bad].unique().tolist()} are outside [0, {vocab}) "
                         f"and are not ignore_index ({ignore_index})")
    rows = keep.nonzero(as_tuple=True)[0]
    if len(rows) < len(target):  # padding: drop those rows before any GEMM
        hidden, target, token_weight = hidden[rows], target[rows], token_weight[rows]
    if len(rows) == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    chunk = chunk or default_chunk(vocab)
    token_weight = token_weight.to(hidden.dtype)
    if not torch.is_grad_enabled():
        return _chunks(hidden, weight, bias, target, token_weight, smoothing, chunk,
                       (False, False, False))[0]
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, token_weight, smoothing, chunk)
