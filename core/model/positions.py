"""Position information, four ways, and ``build_positions(config, bidirectional=...)``.

Each stack (encoder, decoder) owns one position module; it is used in one of three places:

* **added to the embeddings** (``AbsolutePositions``): ``SinusoidalPositions`` (Vaswani et al.
  2017, sec. 3.5) or ``LearnedPositions`` (BERT / BART; BART's table starts at row
  ``position_offset = 2``). Called as ``positions(t, start)`` -> ``(t, d_model)`` rows for
  positions ``start .. start + t - 1`` (``start`` = tokens already in the KV cache).
* **added to the self-attention scores** (``RelativePositionBias``): T5's bucketed relative
  position bias (Raffel et al. 2020, sec. 2.1), bidirectional in the encoder, unidirectional
  in the decoder; one table per stack shared by all its layers. Called as
  ``bias(i, j, offset)`` -> ``(1, h, i, j)``.
* **rotating queries and keys** (``RotaryEmbedding``): RoPE (Su et al. 2021, "RoFormer"),
  given to self-attention as the ``rope(x, offset)`` callable on ``(b, h, t, d)``.

``positions = "none"`` gives ``None``: the model is then permutation-equivariant in the encoder.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from polytask.core.model.config import ModelConfig

POSITIONS = ("sinusoidal", "learned", "relative", "rope", "none")


class AbsolutePositions(nn.Module):
    """Base of the position tables that are added to token embeddings."""

    max_length: int

    def _check(self, t: int, start: int) -> None:
        if start < 0 or start + t > self.max_length:
            raise ValueError(
                f"positions {start}..{start + t - 1} exceed max_length = {self.max_length}")


class SinusoidalPositions(AbsolutePositions):
    """``PE[p, 2k] = sin(p / base^(2k/d))``, ``PE[p, 2k+1] = cos(p / base^(2k/d))``.

    No parameters; computed in fp64 on demand (cheap, and exact for any dtype asked for).
    """

    def __init__(self, d_model: int, max_length: int, base: float = 10000.0) -> None:
        super().__init__()
        self.d_model, self.max_length, self.base = d_model, max_length, base

    def table(self, t: int, start: int = 0, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
        """The slow, obvious twin of ``forward``: compute rows ``start .. start + t - 1``."""
        pos = torch.arange(start, start + t, dtype=torch.float64, device=device)[:, None]
        two_k = torch.arange(0, self.d_model, 2, dtype=torch.float64, device=device)
        angle = pos / self.base ** (two_k / self.d_model)  # (t, ceil(d/2))
        pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # interleave sin, cos
        return pe[:, : self.d_model].to(dtype)

    def forward(self, t: int, start: int = 0, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
        """-> ``(t, d_model)`` for positions ``start .. start + t - 1``.

        Why cached: the whole ``max_length`` table is computed once per (dtype, device) and
        sliced, instead of fp64 sin/cos on every forward and on every decoding step. Not a
        buffer, so it is neither saved nor counted as state; values equal :meth:`table`'s.
        """
        self._check(t, start)
        key = (dtype, torch.device(device) if device is not None else torch.device("cpu"))
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            cache[key] = self.table(self.max_length, 0, dtype=dtype, device=device)
        return cache[key][start: start + t]


class LearnedPositions(AbsolutePositions):
    """A trained table ``weight`` ``(max_length + offset, d_model)``; position ``p`` uses row
    ``p + offset`` (BART keeps two unused rows, ``offset = 2``, for historical reasons)."""

    def __init__(self, d_model: int, max_length: int, offset: int = 0) -> None:
        super().__init__()
        self.max_length, self.offset = max_length, offset
        self.weight = nn.Parameter(torch.zeros(max_length + offset, d_model))

    def forward(self, t: int, start: int = 0, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
        """-> ``(t, d_model)`` rows ``offset + start .. offset + start + t - 1``."""
        self._check(t, start)
        return self.weight[self.offset + start: self.offset + start + t]


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of ``key_pos - query_pos`` into ``[0, num_buckets)`` (Raffel et al. 2020).

    Bidirectional: half the buckets for keys before the query, half for keys after. Within a
    half, the first ``n/2`` distances get one bucket each; larger distances share buckets whose
    width grows logarithmically up to ``max_distance``; beyond that, the last bucket.
    Unidirectional (decoder): keys after the query (which the causal mask hides) go to bucket 0.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets for max_exact <= distance < max_distance (clamp avoids log(0))
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias: a learned scalar per (bucket, head), added to the scores.

    ``relative_attention_bias`` is ``nn.Embedding(num_buckets, n_heads)`` (T5's name).
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, *,
                 bidirectional: bool = True) -> None:
        super().__init__()
        self.n_heads, self.num_buckets, self.max_distance = n_heads, num_buckets, max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, i: int, j: int, offset: int = 0) -> torch.Tensor:
        """Bias ``(1, h, i, j)`` for queries at ``offset .. offset + i - 1``, keys at ``0 .. j - 1``."""
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(offset, offset + i, device=device)[:, None]
        k_pos = torch.arange(j, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance)  # (i, j)
        return rearrange(self.relative_attention_bias(buckets), "i j h -> 1 h i j")

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional}")


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair of features of q and k by an angle proportional to the position.

    Pairs are ``(x[k], x[k + d/2])`` (the "rotate-half" layout of GPT-NeoX and LLaMA, a fixed
    permutation of RoFormer's adjacent pairs), rotated by ``p · base^(-2k/d)``. Then
    ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only (RoFormer, eq. 16). No parameters.
    """

    def __init__(self, d_head: int, base: float = 10000.0) -> None:
        super().__init__()
        if d_head % 2:
            raise ValueError(f"rope needs an even head size, got d_head = {d_head}")
        self.d_head, self.base = d_head, base

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x`` ``(b, h, t, d)`` at positions ``offset .. offset + t - 1`` -> same shape."""
        if x.shape[-1] != self.d_head:
            raise ValueError(f"rope built for d_head = {self.d_head}, got last dim {x.shape[-1]}")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        t, half = x.shape[-2], self.d_head // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=compute, device=x.device) * 2 / self.d_head)
        angle = torch.arange(offset, offset + t, dtype=compute, device=x.device)[:, None] * inv_freq
        cos, sin = angle.cos(), angle.sin()  # (t, d/2)
        x1, x2 = x.to(compute)[..., :half], x.to(compute)[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_head={self.d_head}, base={self.base}"


def build_positions(config: ModelConfig, *, bidirectional: bool) -> nn.Module | None:
    """The position module of one stack (``bidirectional`` = encoder), or None for "none"."""
    kind = config.positions
    if kind == "sinusoidal":
        return SinusoidalPositions(config.d_model, config.max_length)
    if kind == "learned":
        return LearnedPositions(config.d_model, config.max_length, config.position_offset)
    if kind == "relative":
        return RelativePositionBias(config.n_heads, config.relative_buckets,
                                    config.relative_max_distance, bidirectional=bidirectional)
    if kind == "rope":
        return RotaryEmbedding(config.head_dim, config.rope_base)
    if kind == "none":
        return None
    raise ValueError(f"unknown positions {kind!r}; choose one of {', '.join(POSITIONS)}")


def position_parameters(config: ModelConfig) -> int:
    """Parameters of one stack's position module: ``(max_length + position_offset)·d`` learned,
    ``relative_buckets·n_heads`` relative, 0 otherwise."""
    if config.positions == "learned":
        return (config.max_length + config.position_offset) * config.d_model
    if config.positions == "relative":
        return config.relative_buckets * config.n_heads
    return 0
