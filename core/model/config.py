"""``ModelConfig``, every architectural choice of the encoder-decoder as data, and its
parameter / memory estimate (:func:`parameter_estimate`, :func:`check_memory`), computed before
anything is allocated. Fields are checked by the loader in :mod:`polytask.core.model.fields`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from polytask.core.model.fields import bounds, check_fields, from_dict


Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post"]
Activation = Literal["relu", "gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh"]
Positions = Literal["sinusoidal", "learned", "relative", "rope", "none"]
Backend = Literal["auto", "reference", "chunked", "sdpa", "triton"]


@dataclass
class ModelConfig:
    """Every architectural choice of the encoder-decoder, as data.

    Defaults give a pre-norm Transformer (Xiong et al. 2020) with learned absolute positions
    (as BART and GPT-2). Vaswani et al.'s sinusoidal positions have amplitude 1: use them with
    Vaswani's embedding recipe, ``scale_embeddings=True`` (with the default ``init_std``),
    or the 0.02-std token embeddings drown under the positions (measured on the copy task:
    no learning in 200 steps without it, loss 0.4 with it). The T5 options (``positions="relative"``,
    ``norm="rmsnorm"``, ``scale_attention=False``, ``bias=False``, ``rescale_tied_output``) and
    the BART options (``position_offset=2``, ``embedding_norm``, ``norm_position="post"``,
    ``lm_head_bias``) exist so :mod:`polytask.core.interop` can express those models without special
    cases in the model code.
    """

    # token ids; a run sets it from its tokenizer (data.vocab_size)
    vocab_size: int = field(default=8000, metadata=bounds(gt=0))
    d_model: int = field(default=256, metadata=bounds(gt=0))  # width of the residual stream
    n_heads: int = field(default=4, metadata=bounds(gt=0))  # attention heads per layer
    # fewer than n_heads: grouped-query attention
    n_kv_heads: int | None = field(default=None, metadata=bounds(gt=0, null="= n_heads"))
    # T5 allows head sizes other than d_model // n_heads
    d_head: int | None = field(default=None, metadata=bounds(gt=0, null="d_model // n_heads"))
    # encoder layers (0: decoder only)
    n_encoder_layers: int = field(default=3, metadata=bounds(ge=0))
    n_decoder_layers: int = field(default=3, metadata=bounds(ge=0))  # decoder layers
    d_ff: int = field(default=1024, metadata=bounds(gt=0))  # hidden units of the feed-forward block
    # dropout on embeddings, sublayer outputs and feed-forward hidden units
    dropout: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    # dropout on the attention weights
    attention_dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    norm: Norm = "layernorm"  # normalisation layer (rmsnorm: T5's)
    # norm before each sublayer (pre) or after the residual sum (post)
    norm_position: NormPosition = "pre"
    # added to the variance (or mean square) under the square root
    norm_eps: float = field(default=1e-5, metadata=bounds(gt=0))  # 0: 0/0 for a zero row
    final_norm: bool | None = None         # None: True for pre-norm, False for post-norm
    embedding_norm: bool = False           # BART's layernorm_embedding
    # feed-forward activation; swiglu / geglu gate it (Shazeer 2020)
    activation: Activation = "gelu"
    bias: bool = True                      # biases in attention and feed-forward projections
    # position information: absolute tables, T5 relative bias, rotary, or none
    positions: Positions = "learned"
    # for sinusoidal / learned position tables
    max_length: int = field(default=512, metadata=bounds(gt=0))
    # BART's learned positions start at index 2
    position_offset: int = field(default=0, metadata=bounds(ge=0))
    # T5 relative position bias: fewer than 4 buckets leave a half of the bidirectional
    # (encoder) buckets no exact distance, and the bucketing divides by zero
    relative_buckets: int = field(default=32, metadata=bounds(ge=4))
    # distance beyond which T5 relative positions share one bucket
    relative_max_distance: int = field(default=128, metadata=bounds(gt=0))
    # base of the rotary wavelengths; they grow with the dimension only when it is > 1
    # (RoFormer: 10000)
    rope_base: float = field(default=10000.0, metadata=bounds(gt=1))
    scale_attention: bool = True           # False: T5 folds 1/sqrt(d) into its initialisation
    scale_embeddings: bool = False         # multiply embeddings by sqrt(d_model) (Vaswani)
    tie_embeddings: bool = True            # LM head shares the token embedding matrix
    rescale_tied_output: bool = False      # T5: scale decoder output by d_model**-0.5 when tied
    lm_head_bias: bool = False             # BART's final_logits_bias
    # std of the normal weight initialisation
    init_std: float | None = field(default=None, metadata=bounds(gt=0, null="d_model ** -0.5"))
    # attention kernel (auto: the fastest correct one for the device)
    attention_backend: Backend = "auto"
    pad_id: int = 0  # padding token id
    bos_id: int = 2                        # decoder start token
    eos_id: int = 3  # end-of-sequence token id

    def __post_init__(self) -> None:
        check_fields(self, "model")   # types and the declared bounds
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model}) "
                "unless model.d_head is set")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_kv_heads ({self.n_kv_heads}) must be positive and divide "
                f"model.n_heads ({self.n_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size, got {self.head_dim}")
        # the decoder's (unidirectional) buckets give distances below buckets // 2 one bucket
        # each and spread the rest logarithmically up to max_distance, which must lie beyond
        exact = self.relative_buckets // 2
        if self.positions == "relative" and self.relative_max_distance <= exact:
            raise ValueError(
                f"model.relative_max_distance = {self.relative_max_distance} must be > "
                f"model.relative_buckets // 2 = {exact} (T5: 32 buckets, max distance 128)")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"model.{name} = {getattr(self, name)} must be in [0, vocab_size={self.vocab_size})")
        if self.rescale_tied_output and not self.tie_embeddings:
            raise ValueError("model.rescale_tied_output needs model.tie_embeddings = true")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def weight_std(self) -> float:
        """Std of the normal initialisation: ``init_std``, or ``d_model ** -0.5`` by default.

        BERT's fixed 0.02 suits d_model ~ 768; for the small widths used in research ablations
        it makes every attention score ~0 and training stalls (measured: a 2+2-layer d_model 64
        model did not learn the copy task in 300 steps with 0.02, and reached loss 0.004 with
        64 ** -0.5). ``d_model ** -0.5`` keeps activations O(1) at any width, like Xavier
        initialisation (what ``nn.Transformer`` uses) and T5's scheme.
        """
        return self.init_std if self.init_std is not None else self.d_model ** -0.5

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def use_final_norm(self) -> bool:
        return self.final_norm if self.final_norm is not None else self.norm_position == "pre"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ModelConfig":
        return from_dict(cls, data, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_memory(self, *, copies: int = 1, dtype: str = "float32",
                     vocab_size: int | None = None) -> None:
        """:func:`check_memory` for this config: call it before building the model."""
        check_memory(self, copies=copies, dtype=dtype, vocab_size=vocab_size)


# --- sizes before anything is allocated ----------------------------------------------------
#: activations with a gate: three d_model x d_ff matrices instead of two (Shazeer 2020)
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
BYTES_PER_PARAMETER = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def parameter_estimate(config: ModelConfig, vocab_size: int | None = None) -> dict[str, int]:
    """Parameters of ``EncoderDecoder(config)`` by part, computed from the config alone (no
    module is built): ``embeddings`` (the token table and an untied LM head), ``positions``
    (learned tables or relative biases of both stacks), ``encoder layers`` and ``decoder
    layers`` (attention, feed-forward, biases, norms). It leaves out the final and embedding
    norms (a few vectors of d_model), so it is a close lower bound of the exact
    :func:`polytask.core.model.transformer.count_parameters`, which needs the module code.
    ``vocab_size`` replaces the config's (a run's vocabulary comes from its tokenizer)."""
    c = config
    d, v = c.d_model, c.vocab_size if vocab_size is None else vocab_size
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    attention = 2 * d * q + 2 * d * kv + c.bias * (q + 2 * kv + d)
    m = 3 if c.activation in GATED_ACTIVATIONS else 2
    feedforward = m * d * c.d_ff + c.bias * ((m - 1) * c.d_ff + d)
    norm = 2 * d if c.norm == "layernorm" else d
    positions = {"learned": (c.max_length + c.position_offset) * d,
                 "relative": c.relative_buckets * c.n_heads}.get(c.positions, 0)
    return {"embeddings": v * d * (1 + (not c.tie_embeddings)) + v * c.lm_head_bias,
            "positions": 2 * positions,
            "encoder layers": c.n_encoder_layers * (attention + feedforward + 2 * norm),
            "decoder layers": c.n_decoder_layers * (2 * attention + feedforward + 3 * norm)}


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, None where ``os.sysconf`` cannot tell."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def format_bytes(n: float) -> str:
    """``4.1 TB``, ``24 GB``, ``512 bytes`` (powers of 1000)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB", "ZB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} YB"


def _culprit(config: ModelConfig, part: str, vocab_size: int | None) -> str:
    """The config keys behind the largest part of :func:`parameter_estimate`."""
    c = config
    if part in ("encoder layers", "decoder layers"):
        layers = "n_encoder_layers" if part == "encoder layers" else "n_decoder_layers"
        return (f"{layers} = {getattr(c, layers)}, d_model = {c.d_model}, d_ff = {c.d_ff}, "
                f"n_heads = {c.n_heads}")
    if part == "positions":
        return (f"max_length = {c.max_length}, d_model = {c.d_model}" if c.positions == "learned"
                else f"relative_buckets = {c.relative_buckets}, n_heads = {c.n_heads}")
    vocab = c.vocab_size if vocab_size is None else vocab_size
    return f"vocab_size = {vocab}, d_model = {c.d_model}"


def check_memory(config: ModelConfig, *, copies: int = 1, dtype: str = "float32",
                 vocab_size: int | None = None, memory: int | None = None) -> int:
    """Refuse a model whose parameters alone exceed this machine's physical memory, before
    any of it is allocated (``n_encoder_layers: 1000000000`` would otherwise build layers
    until the machine swaps). Returns the estimated bytes.

    ``copies``: backbones built (a multi-task model builds one per task before sharing picks
    its modules); ``dtype``: the parameters' (``train.dtype``); ``memory``: the bytes to
    compare with (default :func:`physical_memory`; no check where it is unknown). Training
    needs about four times this (weights, gradients, two AdamW moments), so passing is
    necessary, not sufficient.
    """
    parts = parameter_estimate(config, vocab_size)
    if dtype not in BYTES_PER_PARAMETER:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(BYTES_PER_PARAMETER)}")
    total = sum(parts.values()) * copies * BYTES_PER_PARAMETER[dtype]
    memory = physical_memory() if memory is None else memory
    if memory is not None and total > memory:
        largest = max(parts, key=parts.get)
        each = f" x {copies} backbones (one per task)" if copies > 1 else ""
        raise ValueError(
            f"model: about {format_bytes(total)} of {dtype} parameters{each}, mostly "
            f"{largest} ({_culprit(config, largest, vocab_size)}), exceeds this machine's "
            f"{format_bytes(memory)} of memory; make the model smaller")
    return total
