"""One cached decoding step of an :class:`polytask.core.model.transformer.EncoderDecoder`, with little Python.

Every step of ``generate`` or ``beam_search`` with a KV cache feeds one new token per row to
a decoder whose caches hold everything before it. Through the modules (``model.decode`` ->
``Decoder`` -> ``DecoderLayer`` -> ``MultiHeadAttention`` -> ``polytask.attention.packed.linear``) such
a step of the benchmark model makes ~1,400 Python calls around its ~60 tensor operations; with
the operations at 10-100 µs each that Python is a fifth of the step. Measured on the benchmark
machine (docs/benchmarks.md), 32 and 256 greedy tokens at the target size: a loop calling the
same kernels directly took 0.22 s and 1.83 s where ``generate`` took 0.27 s and 2.20 s.

:class:`DecodingStep` holds a :class:`_LayerStep` per decoder layer; ``model.decode(...,
layers=step.layers)`` runs them through the decoder's one layer loop (embedding, masks, cache
bookkeeping and the final norm stay the decoder's own). A layer step computes the layer with
the weights resolved once per decoding call:
concatenated q/k/v weights, each weight re-laid once for the native small-rows kernel
(:mod:`polytask.attention.native`; where it is not built, packed for oneDNN:
:func:`polytask.attention.packed.reusable_linear`, the feed-forward activation inside its GEMM), and
the attentions of the ``auto`` backend in the native single-query kernel. It reads the
layers' own modules for everything else (norms, embeddings, positions, LM head), and calls
a sublayer's module wherever a fast form is not obvious (a gated feed-forward, an attention
whose projections are not plain ``nn.Linear``), so it covers every configuration. It
is only built for a model in eval mode, without autograd, with no forward hooks anywhere in the
model (which the step would not run), and it only takes steps in which every cached key is real
(``DecoderState`` passes all-True target masks, so that holds there).

The module path is its twin: tests/core/decoding/test_step.py checks that both give the same
logits and tokens (greedy, sampling, beam search; pre- and post-norm, T5-style relative bias,
RoPE, grouped-query heads, gated feed-forward, padded sources, LoRA-wrapped projections).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polytask.attention.functional import scaled_dot_product_attention
from polytask.attention.kv_cache import KVCache
from polytask.attention.fast import FastMultiHeadAttention, fused_weights
from polytask.attention.multihead import MultiHeadAttention, merge_heads, split_heads
from polytask.attention.native import (MAX_ROWS, SmallRowsLinear, kernels, single_query_attention,
                              single_query_fits, small_rows_linear)
from polytask.attention.packed import ACTIVATIONS, plain_linear, reusable_linear
from polytask.core.accelerate import FastFeedForward
from polytask.core.model.feedforward import FeedForward
from polytask.core.model.layers import DecoderLayer, LayerCache
from polytask.core.model.norms import LayerNorm, RMSNorm
from polytask.core.model.transformer import EncoderDecoder

Linear = Callable[[torch.Tensor], torch.Tensor]
#: the attention modules whose computation the step knows (the plain one and its fast twin)
ATTENTIONS = (MultiHeadAttention, FastMultiHeadAttention)


def _hooked(model: nn.Module) -> bool:
    """True when any module of ``model`` (or the global registry) has a forward hook."""
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _scale(attn: MultiHeadAttention, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if attn.scale is None else attn.scale


def _attend(attn: MultiHeadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None, bias: torch.Tensor | None, native: bool) -> torch.Tensor:
    """The attention's own ``scaled_dot_product_attention`` call for one query per row. Without
    mask and bias, with a key per query head and the sdpa backend, that function only calls
    ``F.scaled_dot_product_attention``; so does this, directly. With ``native`` (the ``auto``
    backend and the kernels built), the native single-query kernel where the tensors fit it
    (:mod:`polytask.attention.native`)."""
    scale = _scale(attn, q.shape[-1])
    if native and mask is None and bias is None and single_query_fits(q, k, v):
        return single_query_attention(q, k, v, scale)
    if (mask is None and bias is None and attn.backend in ("auto", "sdpa") and not q.is_cuda
            and q.shape[1] == k.shape[1]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return scaled_dot_product_attention(q, k, v, mask, scale=scale, backend=attn.backend,
                                        bias=bias)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
            activation: str | None = None) -> Linear:
    """The native small-rows kernel (:mod:`polytask.attention.native`), or oneDNN with the weight packed
    once when the kernels are not built or a call has many rows (beam search)."""
    return small_rows_linear(weight, bias, activation,
                             lambda: reusable_linear(weight, bias, activation))


class _LayerStep:
    """One :class:`polytask.core.model.layers.DecoderLayer` for one new token per row (see the module doc)."""

    def __init__(self, layer: DecoderLayer) -> None:
        self.layer, self.pre = layer, layer.residual.pre
        self.sa = sa = layer.self_attn
        self.ca = ca = layer.cross_attn
        ffn = layer.ffn
        # the norms' forward itself: DecodingStep.build made sure no module has hooks
        self.norms = (layer.self_attn_norm.forward, layer.cross_attn_norm.forward,
                      layer.ffn_norm.forward)
        weight = next(layer.parameters())   # the kernels are built only for CPU fp32 models
        built = weight.dtype is torch.float32 and weight.is_cpu and kernels() is not None
        self.native = tuple(built and type(m) in ATTENTIONS and m.backend == "auto"
                            for m in (sa, ca))
        self.qkv: Linear | None = None
        if type(sa) in ATTENTIONS and plain_linear(sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj):
            projections = (sa.q_proj, sa.k_proj, sa.v_proj)
            self.qkv = _linear(*fused_weights(*projections))
            self.qkv_sizes = [p.out_features for p in projections]
            self.self_out = _linear(sa.out_proj.weight, sa.out_proj.bias)
        self.cross_q: Linear | None = None
        if type(ca) in ATTENTIONS and plain_linear(ca.q_proj, ca.out_proj):
            self.cross_q = _linear(ca.q_proj.weight, ca.q_proj.bias)
            self.cross_out = _linear(ca.out_proj.weight, ca.out_proj.bias)
        self.ffn_in: Linear | None = None
        if type(ffn) in (FeedForward, FastFeedForward) and ffn.activation in ACTIVATIONS and plain_linear(ffn.wi, ffn.wo):
            self.ffn_in = _linear(ffn.wi.weight, ffn.wi.bias, ffn.activation)
            self.ffn_out = _linear(ffn.wo.weight, ffn.wo.bias)
        self.blocks = self._blocks_fit()
        # what a block needs of each norm, resolved once: weight, bias, eps, RMSNorm or not
        self.norm_args = [(n.weight, getattr(n, "bias", None), n.eps, type(n) is RMSNorm)
                          for n in (layer.self_attn_norm, layer.cross_attn_norm, layer.ffn_norm)]

    def _blocks_fit(self) -> bool:
        """True when each sublayer can run as one native block (``attention/native.cpp``):
        pre-norm with this project's LayerNorm or RMSNorm, every projection in the native
        kernel, a key and value head per query head, and the ``auto`` attention backend. The
        blocks do what the Python path below does, with the same kernels, in one call each."""
        layer = self.layer
        norms = (layer.self_attn_norm, layer.cross_attn_norm, layer.ffn_norm)
        linears = (self.qkv, self.cross_q, self.ffn_in)
        if not (self.pre and self.native == (True, True)
                and all(type(n) in (LayerNorm, RMSNorm) for n in norms)
                and all(isinstance(f, SmallRowsLinear) for f in linears)):
            return False
        outs = (self.self_out, self.cross_out, self.ffn_out)
        sa, ca = self.sa, self.ca
        return (all(isinstance(f, SmallRowsLinear) for f in outs)
                and sa.n_kv_heads == sa.n_heads and ca.n_kv_heads == ca.n_heads
                and len(set(self.qkv_sizes)) == 1)

    def _native_blocks(self, x: torch.Tensor, memory: torch.Tensor, cache: LayerCache
                       ) -> torch.Tensor:
        """The layer as three native calls, x ``(b, d)``; see :meth:`_blocks_fit`."""
        k = kernels()
        sa, ca = self.sa, self.ca
        n1, n2, n3 = self.norm_args
        kv = cache.self_attn
        like = x.new_empty((x.shape[0], sa.n_heads, 0, sa.d_head))
        k_buf, v_buf = kv.reserve(1, like, like)
        x = k.self_attention_block(
            x, *n1, self.qkv.panels, self.qkv.bias, self.self_out.panels, self.self_out.bias,
            k_buf, v_buf, kv.length, _scale(sa, sa.d_head))
        kv.length += 1
        cross = self._cross_cache(cache, memory)
        x = k.cross_attention_block(
            x, *n2, self.cross_q.panels, self.cross_q.bias, self.cross_out.panels,
            self.cross_out.bias, cross.k, cross.v, _scale(ca, ca.d_head))
        return k.ffn_block(
            x, *n3, self.ffn_in.panels, self.ffn_in.bias, self.ffn_in.out_features,
            self.layer.ffn.activation, self.ffn_out.panels, self.ffn_out.bias)

    def _residual(self, x: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
                  sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``polytask.core.model.layers._Residual`` in eval mode (no dropout)."""
        return x + sublayer(norm(x)) if self.pre else norm(x + sublayer(x))

    def __call__(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor | None,
                 cross_mask: torch.Tensor | None, bias: torch.Tensor | None,
                 rope: Callable | None, cache: LayerCache) -> torch.Tensor:
        """The signature of :meth:`DecoderLayer.forward`, for one new position per row whose
        cached keys are all real (``self_mask`` None); otherwise the layer itself runs."""
        if self_mask is not None or x.shape[1] != 1:
            return self.layer(x, memory, self_mask, cross_mask, bias, rope, cache)
        if (self.blocks and bias is None and rope is None and cross_mask is None
                and x.shape[0] <= MAX_ROWS and x.dtype is torch.float32 and x.is_cpu):
            return self._native_blocks(x.view(x.shape[0], -1), memory, cache).view(x.shape)
        offset = cache.self_attn.length
        self_norm, cross_norm, ffn_norm = self.norms
        x = self._residual(x, self_norm,
                           lambda h: self._self_attention(h, cache, bias, rope, offset))
        x = self._residual(x, cross_norm,
                           lambda h: self._cross_attention(h, memory, cache, cross_mask))
        return self._residual(x, ffn_norm, self._ffn)

    def _self_attention(self, h, cache, bias, rope, offset) -> torch.Tensor:
        sa = self.sa
        if self.qkv is None:
            return sa(h, causal=True, cache=cache.self_attn, position_bias=bias, rope=rope)
        q, k, v = self.qkv(h).split(self.qkv_sizes, dim=-1)
        q, k, v = (split_heads(q, sa.n_heads), split_heads(k, sa.n_kv_heads),
                   split_heads(v, sa.n_kv_heads))
        if rope is not None:
            q, k = rope(q, offset), rope(k, offset)
        k, v = cache.self_attn.update(k, v)
        return self.self_out(merge_heads(_attend(sa, q, k, v, None, bias, self.native[0])))

    def _cross_attention(self, h, memory, cache, mask) -> torch.Tensor:
        ca = self.ca
        if self.cross_q is None:
            return ca(h, context=memory, mask=mask, cache=cache.cross_attn)
        cross = self._cross_cache(cache, memory)
        q = split_heads(self.cross_q(h), ca.n_heads)
        out = _attend(ca, q, cross.k, cross.v, mask, None, self.native[1])
        return self.cross_out(merge_heads(out))

    def _cross_cache(self, cache: LayerCache, memory: torch.Tensor) -> KVCache:
        """The cross-attention cache, filled with the memory's keys and values on the first
        step."""
        if not cache.cross_attn.is_set:
            cache.cross_attn.set_static(*self.ca._kv(memory))
        return cache.cross_attn

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        if self.ffn_in is None:
            return self.layer.ffn(h)
        return self.ffn_out(self.ffn_in(h))


class DecodingStep:
    """The decoder's layers as :class:`_LayerStep` objects, for ``model.decode(..., layers=
    step.layers)``: the decoder's one layer loop (:func:`polytask.core.model.transformer.run_layers`)
    then runs them instead of the modules. Build it with :meth:`build` inside the decoding call:
    it copies and packs the decoder's weights, so it is only right while they do not change."""

    def __init__(self, model: EncoderDecoder) -> None:
        self.model = model
        self.layers = [_LayerStep(layer) for layer in model.decoder.layers]

    @classmethod
    def build(cls, model: object) -> "DecodingStep | None":
        """A step for ``model``, or None when the module path must run: not an
        ``EncoderDecoder`` of plain decoder layers, a module in training mode, autograd on, or a
        forward hook somewhere."""
        if (not isinstance(model, EncoderDecoder) or torch.is_grad_enabled()
                or any(m.training for m in model.modules()) or _hooked(model)
                or not all(type(layer) is DecoderLayer for layer in model.decoder.layers)):
            return None
        return cls(model)
