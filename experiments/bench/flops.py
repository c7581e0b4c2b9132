"""Analytic FLOP count of one training step of :class:`polytask.core.model.transformer.EncoderDecoder`, and the
fp32 matmul peak it is compared with.

A multiply-add is 2 FLOPs. A linear layer ``y = x W`` with ``W`` ``(n_in, n_out)`` costs
``2·n_in·n_out`` FLOPs per token forward and twice that backward (one GEMM for the input
gradient, one for the weight gradient): ``6·(matmul params)·tokens`` per step, the rule of
Kaplan et al. 2020 (§2.1) and of PaLM's MFU (Chowdhery et al. 2022, App. B). We count:

* **linear layers** — every ``nn.Linear`` weight (q/k/v/out projections, feed-forward
  ``wi``/``wi_0``/``wi_1``/``wo``) times the tokens of its stack (``b·s`` encoder, ``b·t``
  decoder; cross-attention ``k``/``v`` see the ``b·s`` memory tokens), plus the LM head
  ``V·d`` times ``b·t`` (it is a GEMM even when its weight is tied to the embedding);
* **attention matmuls** — ``q kᵀ`` and ``weights · v``: ``2·b·h·i·j·d_head`` each forward,
  ×3 for forward + backward, with ``(i, j) = (s, s)`` encoder self-attention, ``(t, t)``
  decoder self-attention and ``(t, s)`` cross-attention. The causal square is counted whole
  (as PaLM does), not halved.

Not counted (they are not matmuls): embedding lookups, norms, activations, softmax, biases,
the loss and the optimizer step. Those are real time, so the achieved fraction of peak is a
lower bound on how well the GEMMs themselves run.
"""
from __future__ import annotations

import time

import torch

from polytask.core.model.config import ModelConfig
from polytask.core.model.feedforward import GATED


def linear_flops(config: ModelConfig, batch: int, src_len: int, tgt_len: int) -> int:
    """Forward + backward FLOPs of every linear layer and the LM head (see module docstring)."""
    d, dq = config.d_model, config.n_heads * config.head_dim
    dkv = config.kv_heads * config.head_dim
    ffn = (3 if config.activation in GATED else 2) * d * config.d_ff
    attn_q_out, attn_kv = 2 * d * dq, 2 * d * dkv        # q + out; k + v
    enc_tokens, dec_tokens = batch * src_len, batch * tgt_len
    per_token_enc = attn_q_out + attn_kv + ffn               # self-attention + feed-forward
    per_token_dec = 2 * attn_q_out + attn_kv + ffn           # self, cross (q, out) + ffn
    params_x_tokens = (config.n_encoder_layers * per_token_enc * enc_tokens
                       + config.n_decoder_layers * (per_token_dec * dec_tokens
                                                    + attn_kv * enc_tokens)  # cross k, v on memory
                       + config.vocab_size * d * dec_tokens)                  # LM head
    return 6 * params_x_tokens


def attention_flops(config: ModelConfig, batch: int, src_len: int, tgt_len: int) -> int:
    """Forward + backward FLOPs of the score and value matmuls of every attention module."""
    per_pair = 3 * 2 * 2 * batch * config.n_heads * config.head_dim   # (qkᵀ + pv) × (fwd+bwd)
    pairs = (config.n_encoder_layers * src_len * src_len
             + config.n_decoder_layers * (tgt_len * tgt_len + tgt_len * src_len))
    return per_pair * pairs


def step_flops(config: ModelConfig, batch: int, src_len: int, tgt_len: int) -> dict[str, int]:
    """``{"linear": ..., "attention": ..., "total": ...}`` FLOPs of one training step."""
    lin = linear_flops(config, batch, src_len, tgt_len)
    att = attention_flops(config, batch, src_len, tgt_len)
    return {"linear": lin, "attention": att, "total": lin + att}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def matmul_peak(n: int = 2048, repeats: int = 5, timer=time.perf_counter) -> float:
    """Best-of-``repeats`` fp32 ``torch.mm`` throughput of two ``(n, n)`` matrices, FLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = timer()
        torch.mm(a, b)
        best = min(best, timer() - start)
    return 2 * n ** 3 / best


def onednn_matmul_peak(n: int = 2048, repeats: int = 5, timer=time.perf_counter) -> float | None:
    """The same product through oneDNN with the second matrix pre-packed
    (:mod:`polytask.attention.packed`'s kernel), FLOP/s; None if PyTorch has no oneDNN. On the
    benchmark machine it beats ``torch.mm`` (MKL), so it is reported next to the mm peak: a
    fraction of the higher of the two is the stricter figure."""
    from polytask.attention import packed
    if not packed._AVAILABLE:
        return None
    a, b = torch.randn(n, n), torch.randn(n, n)
    w = torch.ops.mkldnn._reorder_linear_weight(b)
    product = lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")  # noqa: E731
    product()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = timer()
        product()
        best = min(best, timer() - start)
    return 2 * n ** 3 / best
