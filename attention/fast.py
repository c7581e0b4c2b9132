"""The CPU-accelerated twin of :class:`polytask.attention.multihead.MultiHeadAttention`.

:class:`FastMultiHeadAttention` computes what its parent computes, with the projections
through :func:`polytask.attention.packed.linear` (oneDNN on a CPU, a packed weight when
inferring) and the q/k/v (self-attention) and k/v (cross-attention) projections fused into one
product each. It adds no parameters and no state: :func:`polytask.core.accelerate.accelerated`
turns a model's attentions into it in place (and back), so the state dict, the parameters and
every ``isinstance`` check stay those of the plain module. The plain module is the obvious
twin: tests/attention/test_fast.py checks that both give the same values and gradients.
"""
from __future__ import annotations

import torch
from torch import nn

from polytask.attention.multihead import MultiHeadAttention, merge_heads, split_heads
from polytask.attention.packed import apply_linear, block_cached, linear, plain_linear


def fused_linear(x: torch.Tensor, *projections: nn.Linear) -> list[torch.Tensor]:
    """``[p(x) for p in projections]`` computed as ONE matmul with the weights concatenated.

    Why faster: one GEMM of width ``sum(n_out)`` instead of several narrow ones reads ``x`` once,
    runs the BLAS kernel at a better aspect ratio, and in backward gives one weight-gradient
    GEMM, one bias reduction and no accumulation of the input gradients from separate branches.
    The weights are concatenated at call time (a copy of ``3·d²`` floats, small next to the
    ``b·t·3·d²`` GEMM), so the separate ``nn.Linear`` modules stay the only source of truth.
    Without autograd inside a :func:`polytask.attention.packed.packed_weights` block (a ``generate``
    call, where that copy is as large as a step's GEMM) the concatenation is made once per
    block (:func:`polytask.attention.packed.block_cached`). The product goes through
    :func:`polytask.attention.packed.linear`.
    """
    out = linear(x, *fused_weights(*projections))
    return list(out.split([p.out_features for p in projections], dim=-1))


def fused_weights(*projections: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projections' weights and biases concatenated along the output features (biases
    None when the projections have none): made on every call with autograd or while tracing
    (an exported graph keeps the separate weights as its inputs), otherwise once per
    :func:`polytask.attention.packed.packed_weights` block (:func:`polytask.attention.packed.block_cached`)."""
    params = tuple(t for p in projections for t in (p.weight, p.bias) if t is not None)
    if (torch.is_grad_enabled() and any(t.requires_grad for t in params)) or torch.jit.is_tracing():
        return _concatenated(projections)
    return block_cached(("fused", *map(id, params)), params, lambda: _concatenated(projections))




def _concatenated(projections: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([p.weight for p in projections])
    bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
    return weight, bias




class FastMultiHeadAttention(MultiHeadAttention):
    """:class:`MultiHeadAttention` with fused projections through oneDNN (see the module doc).
    Projections that are not plain ``nn.Linear`` (a LoRA wrapper) are called as modules."""

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return split_heads(apply_linear(self.q_proj, x), self.n_heads)

    def _kv(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if plain_linear(self.k_proj, self.v_proj):
            k, v = fused_linear(c, self.k_proj, self.v_proj)
        else:
            k, v = apply_linear(self.k_proj, c), apply_linear(self.v_proj, c)
        return split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not plain_linear(self.q_proj, self.k_proj, self.v_proj):
            return (self._q(x), *self._kv(x))
        q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        # heads of a split are strided views of the fused output: no copies.
        return (split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads),
                split_heads(v, self.n_kv_heads))

    def _out(self, heads: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.out_proj, merge_heads(heads))
