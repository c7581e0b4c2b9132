"""BART (Lewis et al. 2020) as a :class:`ModelConfig`, and Hugging Face BART tensor names -> ours.

What BART needs and which ModelConfig option expresses it:

* learned absolute positions whose table keeps two unused leading rows
  (``BartLearnedPositionalEmbedding``, offset 2): ``positions="learned"``,
  ``position_offset=2``, ``max_length = max_position_embeddings``;
* a LayerNorm on the embeddings (``layernorm_embedding``): ``embedding_norm=True``;
* post-norm residual blocks as in the original Transformer, no final stack norm:
  ``norm_position="post"``, ``final_norm=False``, ``norm="layernorm"`` (eps 1e-5);
* biases everywhere, scaled attention, GELU (exact erf form for ``"gelu"``);
* optional ``sqrt(d_model)`` embedding scale (``scale_embedding``): ``scale_embeddings``;
* ``final_logits_bias`` ``(1, V)`` added to the logits: ``lm_head_bias=True``;
* the decoder starts with ``decoder_start_token_id`` (= eos, 2): ``bos_id``.

Hugging Face names follow ``modeling_bart.py`` (``model.encoder.layers.{i}.self_attn.q_proj``,
``fc1``/``fc2``, ``encoder_attn`` for cross-attention); the ``model.`` prefix of
``BartForConditionalGeneration`` is optional.
"""
from __future__ import annotations

import re
from typing import Any

from polytask.core.model.config import ModelConfig
from polytask.core.interop.rules import apply_rules, first

# HF ``ACT2FN`` names -> ours (``gelu`` is the exact erf GELU there as here).
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}

IGNORED: tuple[str, ...] = ()
TIED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
EMBEDDING = "model.shared.weight"
LM_HEAD = "lm_head.weight"
LOGITS_BIAS = "final_logits_bias"

_LAYER = {"self_attn_layer_norm": "self_attn_norm", "encoder_attn_layer_norm": "cross_attn_norm",
          "final_layer_norm": "ffn_norm", "fc1": "ffn.wi", "fc2": "ffn.wo",
          "self_attn": "self_attn", "encoder_attn": "cross_attn"}
_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"model\.shared\.weight"), lambda m: "embed_tokens.weight"),
    (re.compile(r"lm_head\.weight"), lambda m: "lm_head.weight"),
    (re.compile(r"final_logits_bias"), lambda m: "lm_head.bias"),
    (re.compile(r"model\.(encoder|decoder)\.embed_positions\.weight"),
     lambda m: f"{m[1]}.positions.weight"),
    (re.compile(r"model\.(encoder|decoder)\.layernorm_embedding\.(weight|bias)"),
     lambda m: f"{m[1]}.embedding_norm.{m[2]}"),
    (re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)"
                r"\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)"),
     lambda m: f"{m[1]}.layers.{m[2]}.{_LAYER[m[3]]}.{m[4]}.{m[5]}"),
    (re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)"
                r"\.(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm|fc1|fc2)"
                r"\.(weight|bias)"),
     lambda m: f"{m[1]}.layers.{m[2]}.{_LAYER[m[3]]}.{m[4]}"),
]


def canonical(name: str) -> str:
    """Give every name the ``model.`` prefix of ``BartForConditionalGeneration``."""
    if name in ("lm_head.weight", "final_logits_bias") or name.startswith("model."):
        return name
    return "model." + name


def rename(name: str) -> str | None:
    """Our name for (canonical) Hugging Face BART tensor ``name``, or None."""
    return apply_rules(_RULES, name)


def model_config(hf: dict[str, Any], *, tied: bool) -> ModelConfig:
    """``ModelConfig`` of a Hugging Face ``BartConfig`` (as a dict)."""
    for ours, enc, dec in (("n_heads", "encoder_attention_heads", "decoder_attention_heads"),
                           ("d_ff", "encoder_ffn_dim", "decoder_ffn_dim")):
        if hf[enc] != hf[dec]:
            raise ValueError(f"BART {enc} ({hf[enc]}) != {dec} ({hf[dec]}): polytask's "
                             f"model.{ours} is one value for both stacks")
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"BART activation_function = {act!r} is not supported; choose one of "
                         f"{', '.join(ACTIVATIONS)}")
    eos = int(first(hf.get("eos_token_id", 2)))
    start = hf.get("decoder_start_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_heads=hf["encoder_attention_heads"],
        n_encoder_layers=hf["encoder_layers"], n_decoder_layers=hf["decoder_layers"],
        d_ff=hf["encoder_ffn_dim"], dropout=float(hf.get("dropout", 0.1)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        norm="layernorm", norm_position="post", norm_eps=1e-5, final_norm=False,
        embedding_norm=True, activation=ACTIVATIONS[act], bias=True, positions="learned",
        max_length=hf["max_position_embeddings"], position_offset=2, scale_attention=True,
        scale_embeddings=bool(hf.get("scale_embedding", False)), tie_embeddings=tied,
        rescale_tied_output=False, lm_head_bias=True,
        pad_id=int(first(hf.get("pad_token_id", 1))),
        bos_id=int(first(start)) if start is not None else eos, eos_id=eos)
