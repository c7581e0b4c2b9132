"""The encoder-decoder backbone: ``Encoder``, ``Decoder``, ``EncoderDecoder``, ``DecoderCache``
and the analytic ``count_parameters(config)``.

Shapes: b batch, s source length, t target length, d d_model, V vocabulary, h heads.
Padding is on the right; masks are ``(b, L)`` bools, True = real token.

A stack runs in three steps, and the loop over its layers is written once, in
:func:`run_layers`::

    x = encoder.embed(model.embed(src_ids))                  # (b, s, d): + positions, norm, dropout
    p = encoder.prepare(src_mask)                            # masks, position bias, rope
    x = run_layers(x, encoder.layers, p.layer_args())        # x = layer(x, mask, bias, rope)
    memory = encoder.norm(x)

``Encoder.forward`` and ``Decoder.forward`` are exactly these steps. Whoever needs another
layer order passes its own ``layers``: any callables with the layer's signature. The
multi-task model routes the rows of a mixed batch to their task's copy of a layer
(:mod:`polytask.heads.routing`), cross-stitch units mix task columns after every layer
(:mod:`polytask.heads.cross_stitch`), and a cached decoding step runs each layer with fewer
Python calls (:mod:`polytask.core.decoding.step`) — all through this one loop, with the masks
and caches prepared here.

Initialisation (``init_weights``): every ``nn.Linear``/``nn.Embedding`` weight and learned
position table ~ normal(0, ``config.weight_std``), biases zeros, norm gains ones and shifts
zeros — the scheme of BERT (Devlin et al. 2019) and BART with a width-aware default std
(``d_model ** -0.5``, see :attr:`ModelConfig.weight_std`; set ``init_std: 0.02`` for BERT's). It draws
from torch's global generator in module order, so a seed fixes the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from polytask.core.model.config import ModelConfig
from polytask.core.model.feedforward import feedforward_parameters
from polytask.core.model.layers import DecoderLayer, EncoderLayer, LayerCache
from polytask.core.model.norms import LayerNorm, RMSNorm, build_norm, norm_parameters
from polytask.core.model.positions import (AbsolutePositions, LearnedPositions, RelativePositionBias,
                                           RotaryEmbedding, build_positions, position_parameters)

Rope = Callable[[torch.Tensor, int], torch.Tensor]


def drop_full_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``None`` when a ``(b, 1, 1, j)`` key mask lets every query see every key.

    Why faster: with no mask, attention takes the kernel's unmasked (and, for causal
    self-attention, ``is_causal``) path instead of materialising and checking a boolean mask in
    every layer. One ``all()`` per stack per forward replaces that work in all layers.
    """
    return None if mask is None or bool(mask.all()) else mask


@dataclass
class EncoderInputs:
    """What every encoder layer receives besides ``x``: mask ``(b, 1, 1, s)`` or None when
    every position is real, position_bias ``(1, h, s, s)`` or None, rope or None."""

    mask: torch.Tensor | None
    position_bias: torch.Tensor | None
    rope: Rope | None

    def layer_args(self) -> tuple:
        """The arguments after ``x`` of :meth:`EncoderLayer.forward`."""
        return self.mask, self.position_bias, self.rope


@dataclass
class DecoderInputs:
    """What every decoder layer receives besides ``x`` and ``memory``: self_mask
    ``(b, 1, 1, L + t)`` and cross_mask ``(b, 1, 1, s)`` (None when all real), position_bias
    ``(1, h, t, L + t)`` or None, rope or None; ``start`` = L, the positions already cached,
    and ``keys`` ``(b, L + t)`` the key padding mask the cache holds afterwards."""

    self_mask: torch.Tensor | None
    cross_mask: torch.Tensor | None
    position_bias: torch.Tensor | None
    rope: Rope | None
    start: int
    keys: torch.Tensor

    def layer_args(self, memory: torch.Tensor) -> tuple:
        """The arguments after ``x`` of :meth:`DecoderLayer.forward`, cache excepted."""
        return memory, self.self_mask, self.cross_mask, self.position_bias, self.rope


def run_layers(x: torch.Tensor, layers: Sequence[Callable[..., torch.Tensor]], args: tuple,
               caches: Sequence[object] | None = None) -> torch.Tensor:
    """The loop over a stack's layers: ``x = layer(x, *args)`` (``layer(x, *args, cache_n)``
    with ``caches``), bottom to top. ``args`` come from :meth:`EncoderInputs.layer_args` or
    :meth:`DecoderInputs.layer_args`."""
    for n, layer in enumerate(layers):
        x = layer(x, *args) if caches is None else layer(x, *args, caches[n])
    return x


class DecoderCache:
    """Incremental-decoding state: one :class:`LayerCache` per decoder layer plus the key
    padding mask of the ``length`` positions decoded so far.

    ``reorder(index)`` selects batch rows (beam search); the caller reorders ``memory`` and
    ``src_mask`` the same way.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.key_mask: torch.Tensor | None = None  # (b, length) bool

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.self_attn.reorder(index)
            layer.cross_attn.reorder(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)


class _Stack(nn.Module):
    """What encoder and decoder share: positions, embedding norm, dropout, final norm."""

    def __init__(self, config: ModelConfig, *, bidirectional: bool) -> None:
        super().__init__()
        self.positions = build_positions(config, bidirectional=bidirectional)
        self.embedding_norm = build_norm(config) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout)
        self.norm = build_norm(config) if config.use_final_norm else nn.Identity()

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token embeddings ``(b, t, d)`` at positions ``start..`` -> layer input ``(b, t, d)``:
        + absolute positions, then the embedding norm (BART), then dropout."""
        if isinstance(self.positions, AbsolutePositions):
            tokens = tokens + self.positions(tokens.shape[1], start, dtype=tokens.dtype,
                                             device=tokens.device)
        if self.embedding_norm is not None:
            tokens = self.embedding_norm(tokens)
        return self.dropout(tokens)

    def bias_and_rope(self, i: int, j: int) -> tuple[torch.Tensor | None, Rope | None]:
        """Position bias ``(1, h, i, j)`` for ``i`` queries at the end of ``j`` keys (T5), or
        None; the rotary embedding (RoPE), or None."""
        bias = self.positions(i, j, j - i) if isinstance(self.positions, RelativePositionBias) else None
        rope = self.positions if isinstance(self.positions, RotaryEmbedding) else None
        return bias, rope


class Encoder(_Stack):
    """``layers`` (EncoderLayer), ``norm`` (final norm or Identity), ``positions``,
    ``embedding_norm``. ``forward(tokens (b, s, d), src_mask (b, s))`` -> memory ``(b, s, d)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))

    def prepare(self, src_mask: torch.Tensor) -> EncoderInputs:
        """The layers' inputs for ``src_mask`` ``(b, s)``."""
        s = src_mask.shape[1]
        return EncoderInputs(drop_full_mask(src_mask[:, None, None, :]), *self.bias_and_rope(s, s))

    def forward(self, tokens: torch.Tensor, src_mask: torch.Tensor,
                layers: Sequence[Callable[..., torch.Tensor]] | None = None) -> torch.Tensor:
        """``layers``: callables to run instead of ``self.layers`` (see the module doc)."""
        x, p = self.embed(tokens), self.prepare(src_mask)
        x = run_layers(x, self.layers if layers is None else layers, p.layer_args())
        return self.norm(x)


class Decoder(_Stack):
    """``layers`` (DecoderLayer), ``norm``, ``positions``, ``embedding_norm``; always causal."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))

    def prepare(self, tgt_mask: torch.Tensor, src_mask: torch.Tensor,
                cache: DecoderCache | None = None) -> DecoderInputs:
        """The layers' inputs for ``t`` new positions, ``tgt_mask`` ``(b, t)``, after the ones
        ``cache`` holds, with ``src_mask`` ``(b, s)``."""
        start = cache.length if cache is not None else 0
        keys = tgt_mask if not start else torch.cat([cache.key_mask, tgt_mask], dim=1)
        bias, rope = self.bias_and_rope(tgt_mask.shape[1], keys.shape[1])
        return DecoderInputs(drop_full_mask(keys[:, None, None, :]),
                             drop_full_mask(src_mask[:, None, None, :]), bias, rope, start, keys)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor,
                src_mask: torch.Tensor, cache: DecoderCache | None = None,
                layers: Sequence[Callable[..., torch.Tensor]] | None = None) -> torch.Tensor:
        """tokens ``(b, t, d)``, memory ``(b, s, d)``, tgt_mask ``(b, t)`` of the new positions
        -> hidden ``(b, t, d)`` after the final norm. Appends to ``cache`` if given.
        ``layers``: callables to run instead of ``self.layers`` (see the module doc)."""
        p = self.prepare(tgt_mask, src_mask, cache)
        x = self.embed(tokens, p.start)
        x = run_layers(x, self.layers if layers is None else layers, p.layer_args(memory),
                       cache.layers if cache is not None else None)
        if cache is not None:
            cache.key_mask = p.keys
        return self.norm(x)


def init_weights(module: nn.Module, std: float) -> None:
    """The initialisation described in the module docstring, for one module (use ``apply``)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, LearnedPositions):
        nn.init.normal_(module.weight, 0.0, std)
    if isinstance(module, (LayerNorm, RMSNorm, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class EncoderDecoder(nn.Module):
    """Encoder-decoder Transformer (Vaswani et al. 2017) with the T5/BART options of
    :class:`ModelConfig`. Members: ``embed_tokens`` (shared by both stacks), ``encoder``,
    ``decoder``, ``lm_head`` (its weight *is* ``embed_tokens.weight`` when ``tie_embeddings``;
    save with ``safetensors.torch.save_model``, which handles shared tensors).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        self.apply(lambda m: init_weights(m, config.weight_std))
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(b, L)`` ids -> ``(b, L, d)``, times ``sqrt(d)`` if ``scale_embeddings`` (Vaswani 3.4)."""
        x = self.embed_tokens(ids)
        return x * math.sqrt(self.config.d_model) if self.config.scale_embeddings else x

    def _mask(self, ids: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
        if mask is None:
            return ids != self.config.pad_id
        if mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(ids.shape)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        return mask

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``src_ids`` ``(b, s)`` -> memory ``(b, s, d)``."""
        return self.encoder(self.embed(src_ids), self._mask(src_ids, src_mask, "src_mask"))

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor,
               src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
               cache: DecoderCache | None = None,
               layers: Sequence[Callable[..., torch.Tensor]] | None = None) -> torch.Tensor:
        """``tgt_ids`` ``(b, t)`` (the new tokens when ``cache`` holds earlier ones), memory
        ``(b, s, d)`` -> hidden ``(b, t, d)`` after the final norm. ``layers`` as in
        :meth:`Decoder.forward`.

        ``src_mask=None`` means every memory position is real (pass the mask used in
        ``encode``). ``tgt_mask=None`` derives it from ``pad_id`` except that target position 0,
        the decoder start token, is always real: T5 uses the pad id as its start token.
        """
        if src_mask is None:
            src_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        if tgt_mask is None:
            tgt_mask = tgt_ids != self.config.pad_id
            if cache is None or cache.length == 0:
                tgt_mask[:, 0] = True
        tgt_mask = self._mask(tgt_ids, tgt_mask, "tgt_mask")
        return self.decoder(self.embed(tgt_ids), memory, tgt_mask, src_mask, cache, layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(b, t, d)`` -> ``(b, t, V)``; T5 scales tied outputs by ``d**-0.5`` first."""
        if self.config.rescale_tied_output:
            hidden = hidden * self.config.d_model ** -0.5
        return self.lm_head(hidden)

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor,
                src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``src_ids`` ``(b, s)``, ``tgt_ids`` ``(b, t)`` -> logits ``(b, t, V)``."""
        src_mask = self._mask(src_ids, src_mask, "src_mask")
        memory = self.encode(src_ids, src_mask)
        return self.logits(self.decode(tgt_ids, memory, src_mask, tgt_mask))

    def new_cache(self) -> DecoderCache:
        return DecoderCache(len(self.decoder.layers))


def attention_parameters(config: ModelConfig) -> int:
    """One MultiHeadAttention: q and out ``d·h·dh`` each, k and v ``d·hk·dh`` each, and with
    bias ``h·dh + 2·hk·dh + d``."""
    d, q, kv = config.d_model, config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    return 2 * d * q + 2 * d * kv + config.bias * (q + 2 * kv + d)


def count_parameters(config: ModelConfig) -> int:
    """Analytic parameter count of ``EncoderDecoder(config)``::

        V·d                                         token embedding (shared by both stacks)
        + n_enc·(A + F + 2N) + n_dec·(2A + F + 3N)   layers
        + 2·P + 2·N·[embedding_norm] + 2·N·[final norm]
        + V·d·[not tie_embeddings] + V·[lm_head_bias]

    with A = :func:`attention_parameters`, F = :func:`feedforward_parameters`, N = norm
    (``2d`` LayerNorm, ``d`` RMSNorm), P = one stack's position parameters
    (``(max_length + position_offset)·d`` learned, ``buckets·h`` relative, else 0).
    """
    a, f, n = attention_parameters(config), feedforward_parameters(config), norm_parameters(config)
    v, d = config.vocab_size, config.d_model
    total = v * d
    total += config.n_encoder_layers * (a + f + 2 * n) + config.n_decoder_layers * (2 * a + f + 3 * n)
    total += 2 * position_parameters(config)
    total += 2 * n * config.embedding_norm + 2 * n * config.use_final_norm
    total += v * d * (not config.tie_embeddings) + v * config.lm_head_bias
    return total
