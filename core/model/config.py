"""Typed configuration: ``ModelConfig`` and the strict dict -> dataclass loader every config
section uses. A wrong key or value fails loudly, naming the key, the value and the choices.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def check_fields(obj: Any, section: str) -> None:
    """Raise ``ValueError`` if any field of dataclass ``obj`` has a value outside its type."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if not _type_ok(value, tp):
            raise ValueError(f"{section}.{f.name} = {value!r} is invalid: expected {_describe(tp)}")
        if get_args(tp) and float in get_args(tp) and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
        elif tp is float and isinstance(value, int):
            setattr(obj, f.name, float(value))


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ValueError`` listing the known."""
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"config section {section or cls.__name__} must be a mapping of keys to "
                         f"values, got {type(data).__name__} {data!r}")
    data = dict(data or {})
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{section}." if section else ""
        raise ValueError(
            f"unknown config key {where}{unknown[0]}; known keys: {', '.join(names)}")
    return cls(**data)


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

    vocab_size: int = 8000
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None          # None: = n_heads; fewer: grouped-query attention
    d_head: int | None = None              # None: d_model // n_heads (T5 allows others)
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    norm: Norm = "layernorm"
    norm_position: NormPosition = "pre"
    norm_eps: float = 1e-5
    final_norm: bool | None = None         # None: True for pre-norm, False for post-norm
    embedding_norm: bool = False           # BART's layernorm_embedding
    activation: Activation = "gelu"
    bias: bool = True                      # biases in attention and feed-forward projections
    positions: Positions = "learned"
    max_length: int = 512                  # for sinusoidal / learned position tables
    position_offset: int = 0               # BART's learned positions start at index 2
    relative_buckets: int = 32             # T5 relative position bias
    relative_max_distance: int = 128
    rope_base: float = 10000.0
    scale_attention: bool = True           # False: T5 folds 1/sqrt(d) into its initialisation
    scale_embeddings: bool = False         # multiply embeddings by sqrt(d_model) (Vaswani)
    tie_embeddings: bool = True            # LM head shares the token embedding matrix
    rescale_tied_output: bool = False      # T5: scale decoder output by d_model**-0.5 when tied
    lm_head_bias: bool = False             # BART's final_logits_bias
    init_std: float | None = None          # None: d_model ** -0.5 (see weight_std)
    attention_backend: Backend = "auto"
    pad_id: int = 0
    bos_id: int = 2                        # decoder start token
    eos_id: int = 3

    def __post_init__(self) -> None:
        check_fields(self, "model")
        positive = ("vocab_size", "d_model", "n_heads", "d_ff", "max_length", "relative_buckets",
                    "relative_max_distance")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} = {getattr(self, name)} must be positive")
        for name in ("n_encoder_layers", "n_decoder_layers", "position_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} = {getattr(self, name)} must be >= 0")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} = {getattr(self, name)} must be in [0, 1)")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model}) "
                "unless model.d_head is set")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                f"model.n_kv_heads ({self.n_kv_heads}) must be positive and divide "
                f"model.n_heads ({self.n_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size, got {self.head_dim}")
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
