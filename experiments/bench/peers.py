"""The models the training and decoding benchmarks compare, built at one shared size.

Every builder returns a :class:`Contender`: the module, ``logits(src, tgt) -> (b, t, V)`` and
the training loss ``loss(src, tgt, labels)`` (cross-entropy of the logits for the peers; for
polytask the path its training loop takes, which never materialises the logits).
A peer whose library is missing (or fails to build) is reported by ``build_all`` as
``{name: "error text"}`` instead of a contender, never raised.

* ``polytask`` — :class:`polytask.core.model.transformer.EncoderDecoder` with the default (pre-norm,
  learned positions, GELU, biased) :class:`polytask.core.model.config.ModelConfig` at that size.
* ``hf_t5`` — Hugging Face ``T5ForConditionalGeneration`` (RMSNorm, relative position bias,
  ReLU, no biases, tied embeddings), ``d_kv = d_model // n_heads``; SDPA attention.
* ``torch`` — ``torch.nn.Transformer`` (pre-norm, GELU, batch-first) plus a token embedding,
  sinusoidal positions and an output projection tied to the embedding.
* ``x_transformers`` — lucidrains' ``XTransformer`` (its encoder and decoder networks called
  directly so it returns logits like the others), tied token embeddings.

All use the same width, heads, depths, feed-forward width, vocabulary and dropout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polytask.core.model.config import ModelConfig
from polytask.core.model.transformer import EncoderDecoder
from polytask.losses.generative import GenerativeLoss

Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Size:
    """The shared model size and batch shape of one benchmark run."""

    d_model: int = 256
    n_heads: int = 4
    layers: int = 3          # encoder layers = decoder layers
    d_ff: int = 1024
    vocab: int = 8000
    batch: int = 16
    length: int = 128        # source length = target length
    dropout: float = 0.0


SIZES = {
    "toy": Size(d_model=32, n_heads=2, layers=1, d_ff=64, vocab=50, batch=2, length=8),
    "small": Size(d_model=128, n_heads=4, layers=2, d_ff=512, vocab=4000, batch=8, length=64),
    "target": Size(),  # the target point
    "large": Size(d_model=512, n_heads=8, layers=6, d_ff=2048, vocab=32000, batch=16, length=256),
}


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def logits_loss(logits: Logits) -> Loss:
    """The peers' training loss: ``F.cross_entropy`` of their logits, mean over tokens."""
    def loss(src: torch.Tensor, tgt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = logits(src, tgt)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
    return loss


@dataclass
class Contender:
    """``logits(src, tgt_in)``; ``loss(src, tgt_in, labels)`` is what a training step
    differentiates (default: cross-entropy of ``logits``)."""

    name: str
    model: nn.Module
    logits: Logits
    loss: Loss | None = None

    def __post_init__(self) -> None:
        if self.loss is None:
            self.loss = logits_loss(self.logits)


def polytask_config(size: Size) -> ModelConfig:
    return ModelConfig(vocab_size=size.vocab, d_model=size.d_model, n_heads=size.n_heads,
                       n_encoder_layers=size.layers, n_decoder_layers=size.layers,
                       d_ff=size.d_ff, dropout=size.dropout, max_length=max(512, size.length),
                       pad_id=0, bos_id=2, eos_id=3)


def build_polytask(size: Size) -> Contender:
    """polytask's training path: the token-mean ``generative`` loss computed from the decoder
    states by the chunked LM head + cross-entropy (:mod:`polytask.losses.linear_ce`), as the training
    loop does (``polytask.heads.objective``)."""
    model = EncoderDecoder(polytask_config(size))
    criterion = GenerativeLoss()

    def loss(src: torch.Tensor, tgt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        src_mask = src != model.config.pad_id
        hidden = model.decode(tgt, model.encode(src, src_mask), src_mask)
        return criterion.from_hidden(hidden, model, labels.reshape(tgt.shape))

    return Contender("polytask", model, lambda src, tgt: model(src, tgt), loss)


def build_hf_t5(size: Size) -> Contender:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=size.vocab, d_model=size.d_model, d_kv=size.d_model // size.n_heads,
                      d_ff=size.d_ff, num_layers=size.layers, num_decoder_layers=size.layers,
                      num_heads=size.n_heads, dropout_rate=size.dropout, feed_forward_proj="relu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    return Contender("hf_t5", model,
                     lambda src, tgt: model(input_ids=src, decoder_input_ids=tgt).logits)


class TorchTransformer(nn.Module):
    """``nn.Transformer`` with a tied token embedding / output projection and sinusoidal
    positions (Vaswani et al. 2017, §3.5): ids in, logits out."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.d_model)
        self.transformer = nn.Transformer(
            size.d_model, size.n_heads, size.layers, size.layers, size.d_ff, size.dropout,
            activation="gelu", batch_first=True, norm_first=True)
        pos = torch.arange(4096)[:, None]
        inv = torch.exp(torch.arange(0, size.d_model, 2) * (-math.log(10000.0) / size.d_model))
        table = torch.zeros(4096, size.d_model)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
        self.register_buffer("positions", table, persistent=False)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s, t = src.shape[1], tgt.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=tgt.device)
        y = self.transformer(self.embed(src) + self.positions[:s], self.embed(tgt) + self.positions[:t],
                             tgt_mask=causal, tgt_is_causal=True)
        return y @ self.embed.weight.T


def build_torch(size: Size) -> Contender:
    model = TorchTransformer(size)
    return Contender("torch", model, model)


def build_x_transformers(size: Size) -> Contender:
    from x_transformers import XTransformer

    model = XTransformer(
        dim=size.d_model, tie_token_emb=True,
        enc_num_tokens=size.vocab, enc_depth=size.layers, enc_heads=size.n_heads,
        enc_max_seq_len=size.length, enc_ff_mult=size.d_ff / size.d_model,
        enc_attn_dim_head=size.d_model // size.n_heads, enc_ff_dropout=size.dropout,
        dec_num_tokens=size.vocab, dec_depth=size.layers, dec_heads=size.n_heads,
        dec_max_seq_len=size.length, dec_ff_mult=size.d_ff / size.d_model,
        dec_attn_dim_head=size.d_model // size.n_heads, dec_ff_dropout=size.dropout)

    def logits(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = model.encoder(src, return_embeddings=True)
        return model.decoder.net(tgt, context=memory)

    return Contender("x_transformers", model, logits)


BUILDERS: dict[str, Callable[[Size], Contender]] = {
    "polytask": build_polytask, "hf_t5": build_hf_t5, "torch": build_torch,
    "x_transformers": build_x_transformers,
}


def build_all(size: Size, names: list[str]) -> tuple[list[Contender], dict[str, str]]:
    """Build the named contenders with the same seed; missing peers go to the second result."""
    built, missing = [], {}
    for name in names:
        if name not in BUILDERS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
        torch.manual_seed(0)
        try:
            built.append(BUILDERS[name](size))
        except Exception as exc:  # a missing or broken peer is reported, not fatal
            if name == "polytask":
                raise
            missing[name] = f"{type(exc).__name__}: {exc}"
    return built, missing
