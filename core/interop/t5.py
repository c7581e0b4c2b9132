"""T5 (Raffel et al. 2020) as a :class:`ModelConfig`, and Hugging Face T5 tensor names -> ours.

What T5 needs and which ModelConfig option expresses it:

* relative position bias, one table per stack, stored in block 0's self-attention and shared
  by every layer (bidirectional in the encoder, unidirectional in the decoder):
  ``positions="relative"``, ``relative_buckets``, ``relative_max_distance``;
* RMS norms without bias or mean (``T5LayerNorm``, variance in fp32), pre-norm, final norm:
  ``norm="rmsnorm"``, ``norm_position="pre"``, ``final_norm=True``;
* no ``1/sqrt(d)`` on the scores (folded into T5's initialisation): ``scale_attention=False``;
* no biases anywhere: ``bias=False``; head size ``d_kv`` independent of ``d_model / heads``:
  ``d_head``;
* v1.0: ReLU and a tied LM head whose input is scaled by ``d_model**-0.5``
  (``rescale_tied_output``); v1.1: gated GELU, tanh approximation ("gated-gelu" ->
  ``gelu_new``), no rescaling, untied head (``activation="geglu_tanh"``, ``tie_embeddings``);
* decoder start token = pad token (``bos_id = decoder_start_token_id``, 0).

Hugging Face names follow ``modeling_t5.py``: ``encoder.block.{i}.layer.{0: self-attention,
1: feed-forward}``, ``decoder.block.{i}.layer.{0: self, 1: cross (EncDecAttention), 2: ffn}``.
"""
from __future__ import annotations

import re
from typing import Any

from polytask.core.model.config import ModelConfig
from polytask.core.interop.rules import apply_rules, first

# (is_gated, HF dense_act_fn) -> polytask activation. Sources: HF ``T5Config.__post_init__``
# (``feed_forward_proj = "[gated-]ACT"``; "gated-gelu" means ``gelu_new``) and ``ACT2FN``
# (``gelu_new`` and ``gelu_pytorch_tanh`` are the tanh approximation).
ACTIVATIONS = {
    (False, "relu"): "relu",
    (False, "gelu"): "gelu",
    (False, "gelu_new"): "gelu_tanh",
    (False, "gelu_pytorch_tanh"): "gelu_tanh",
    (True, "gelu"): "geglu",
    (True, "gelu_new"): "geglu_tanh",
    (True, "gelu_pytorch_tanh"): "geglu_tanh",
    (True, "silu"): "swiglu",
    (True, "swish"): "swiglu",
}

# Tensors Hugging Face itself ignores when loading (``_keys_to_ignore_on_load_unexpected``).
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# Copies of ``shared.weight`` kept by each stack; must equal it (checked by the loader).
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
EMBEDDING = "shared.weight"
LM_HEAD = "lm_head.weight"

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"shared\.weight"), lambda m: "embed_tokens.weight"),
    (re.compile(r"lm_head\.weight"), lambda m: "lm_head.weight"),
    (re.compile(r"(encoder|decoder)\.final_layer_norm\.weight"), lambda m: f"{m[1]}.norm.weight"),
    (re.compile(r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"),
     lambda m: f"{m[1]}.positions.relative_attention_bias.weight"),
    (re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight"),
     lambda m: f"{m[1]}.layers.{m[2]}.self_attn.{_ATTN[m[3]]}.weight"),
    (re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.weight"),
     lambda m: f"{m[1]}.layers.{m[2]}.self_attn_norm.weight"),
    (re.compile(r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])\.weight"),
     lambda m: f"decoder.layers.{m[1]}.cross_attn.{_ATTN[m[2]]}.weight"),
    (re.compile(r"decoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight"),
     lambda m: f"decoder.layers.{m[1]}.cross_attn_norm.weight"),
    (re.compile(r"(?:encoder\.block\.(\d+)\.layer\.1|decoder\.block\.(\d+)\.layer\.2)"
                r"\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight"),
     lambda m: f"{'encoder' if m[1] else 'decoder'}.layers.{m[1] or m[2]}.ffn.{m[3]}.weight"),
    (re.compile(r"(?:encoder\.block\.(\d+)\.layer\.1|decoder\.block\.(\d+)\.layer\.2)\.layer_norm\.weight"),
     lambda m: f"{'encoder' if m[1] else 'decoder'}.layers.{m[1] or m[2]}.ffn_norm.weight"),
]


def rename(name: str) -> str | None:
    """Our name for Hugging Face T5 tensor ``name``, or None if it has no counterpart."""
    return apply_rules(_RULES, name)


def model_config(hf: dict[str, Any], *, tied: bool) -> tuple[ModelConfig, bool]:
    """``ModelConfig`` of a Hugging Face ``T5Config`` (as a dict), and whether the decoder
    output must be scaled by ``d_model**-0.5`` before the LM head.

    ``tied``: whether the checkpoint's LM head is the embedding matrix. The scale flag is HF's
    ``scale_decoder_outputs`` (transformers >= 5) or else ``tie_word_embeddings`` (older
    configs, where it meant both tying and scaling).
    """
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    act = hf.get("dense_act_fn") or parts[-1]
    if proj == "gated-gelu":
        act = "gelu_new"  # HF's backwards-compatibility rule
    key = (gated, act)
    if key not in ACTIVATIONS:
        known = ", ".join(("gated-" if g else "") + a for g, a in ACTIVATIONS)
        raise ValueError(f"T5 feed_forward_proj = {proj!r} (dense_act_fn {act!r}) is not supported; "
                         f"choose one of {known}")
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    scale = bool(scale) if scale is not None else True
    pad = int(first(hf.get("pad_token_id", 0)))
    start = hf.get("decoder_start_token_id")
    config = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_heads=hf["num_heads"],
        d_head=hf.get("d_kv", hf["d_model"] // hf["num_heads"]),
        n_encoder_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        # T5 applies dropout_rate to the attention weights as well as the residual branches
        d_ff=hf["d_ff"], dropout=float(hf.get("dropout_rate", 0.1)),
        attention_dropout=float(hf.get("dropout_rate", 0.1)),
        norm="rmsnorm", norm_position="pre", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        final_norm=True, embedding_norm=False, activation=ACTIVATIONS[key], bias=False,
        positions="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        scale_attention=False, scale_embeddings=False, tie_embeddings=tied,
        rescale_tied_output=scale and tied, lm_head_bias=False, pad_id=pad,
        bos_id=int(first(start)) if start is not None else pad,
        eos_id=int(first(hf.get("eos_token_id", 1))))
    return config, scale
