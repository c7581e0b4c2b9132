"""Parity of :func:`polytask.core.interop.from_hf` against Hugging Face ``transformers`` (the oracle).

Small T5 v1.0, T5 v1.1 and BART models are built offline from config objects with random
weights (norm gains, biases, position tables and BART's final_logits_bias randomised too, so
a mapping that skips any of them fails). Checked: full-forward logits on padded batches, KV-cached
step-by-step logits, greedy generation, directory and state-dict sources, and strict errors.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

from polytask.core.decoding.generation import generate  # noqa: E402
from polytask.core.interop import from_hf  # noqa: E402

ATOL = 1e-4
VOCAB = 61


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give norm gains, biases and bias-like buffers non-default random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "norm" in name:
                p.copy_(0.2 * noise)
            elif p.dim() == 1 or "relative_attention_bias" in name or "embed_positions" in name:
                p.copy_(0.5 * noise)
            elif p.std() < 0.05:  # BART's 0.02 init: cross-attention would barely see the encoder
                p.copy_(0.25 * noise)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.copy_(0.1 * torch.randn(model.final_logits_bias.shape, generator=g))
    return model.eval()


def _t5(version: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, d_model=16, d_ff=24, num_layers=3, num_decoder_layers=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if version == "v1.0":
        cfg = transformers.T5Config(d_kv=4, num_heads=4, feed_forward_proj="relu", **common)
        return _randomise(transformers.T5ForConditionalGeneration(cfg), 1)
    # v1.1: gated-gelu (gelu_new), d_kv * heads != d_model, untied LM head, no output scaling
    cfg = transformers.T5Config(d_kv=6, num_heads=3, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, **common)
    model = transformers.T5ForConditionalGeneration(cfg)
    model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, 16))
    return _randomise(model, 2)


def _bart() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=24,
        decoder_ffn_dim=24, max_position_embeddings=40, scale_embedding=True,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    model = transformers.BartForConditionalGeneration(cfg)
    # HF's BART default forces eos at max_length; polytask's greedy has no such rule
    model.generation_config.forced_eos_token_id = None
    return _randomise(model, 3)


FAMILIES = {"t5-v1.0": lambda: _t5("v1.0"), "t5-v1.1": lambda: _t5("v1.1"), "bart": _bart}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    hf = FAMILIES[request.param]()
    return request.param, hf, from_hf(hf)


def _batch(b: int, s: int, t: int, pad: int, start: int, seed: int):
    """Right-padded sources of lengths s, s-3, s-6, ... (at least 1); targets begin with start."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (b, s), generator=g)
    lengths = torch.tensor([max(1, s - 3 * r) for r in range(b)])
    src_mask = torch.arange(s)[None, :] < lengths[:, None]
    src = src.masked_fill(~src_mask, pad)
    tgt = torch.randint(3, VOCAB, (b, t), generator=g)
    tgt[:, 0] = start
    return src, src_mask, tgt


def _hf_logits(hf, src, src_mask, tgt, tgt_mask=None):
    with torch.no_grad():
        return hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt,
                  decoder_attention_mask=None if tgt_mask is None else tgt_mask.long()).logits


def test_config_expresses_each_variant(pair):
    name, hf, model = pair
    c = model.config
    if name.startswith("t5"):
        assert (c.positions, c.norm, c.scale_attention, c.bias) == ("relative", "rmsnorm", False, False)
        assert (c.activation, c.tie_embeddings, c.rescale_tied_output) == (
            ("relu", True, True) if name == "t5-v1.0" else ("geglu_tanh", False, False))
        assert c.head_dim == hf.config.d_kv and c.bos_id == c.pad_id == 0
    else:
        assert (c.positions, c.position_offset, c.norm_position, c.embedding_norm) == (
            "learned", 2, "post", True)
        assert c.lm_head_bias and c.scale_embeddings and c.bos_id == c.eos_id == 2


@pytest.mark.parametrize("b,s,t", [(1, 5, 4), (3, 11, 9), (2, 19, 7)])
def test_forward_logits_match(pair, b, s, t):
    name, hf, model = pair
    src, src_mask, tgt = _batch(b, s, t, model.config.pad_id, model.config.bos_id, seed=s)
    expected = _hf_logits(hf, src, src_mask, tgt)
    with torch.no_grad():
        got = model(src, tgt, src_mask, torch.ones_like(tgt, dtype=torch.bool))
    assert expected.abs().max() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_padded_targets_match_at_real_positions(pair):
    name, hf, model = pair
    src, src_mask, tgt = _batch(3, 9, 8, model.config.pad_id, model.config.bos_id, seed=7)
    tgt_mask = torch.arange(8)[None, :] < torch.tensor([8, 5, 2])[:, None]
    tgt = tgt.masked_fill(~tgt_mask, model.config.pad_id)
    expected = _hf_logits(hf, src, src_mask, tgt, tgt_mask)
    with torch.no_grad():
        got = model(src, tgt, src_mask, tgt_mask)
    torch.testing.assert_close(got[tgt_mask], expected[tgt_mask], atol=ATOL, rtol=0)


def test_kv_cached_steps_match(pair):
    name, hf, model = pair
    src, src_mask, tgt = _batch(3, 13, 10, model.config.pad_id, model.config.bos_id, seed=3)
    expected = _hf_logits(hf, src, src_mask, tgt)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        cache = model.new_cache()
        for i in range(tgt.shape[1]):
            step = tgt[:, i:i + 1]
            hidden = model.decode(step, memory, src_mask, torch.ones_like(step, dtype=torch.bool), cache)
            torch.testing.assert_close(model.logits(hidden)[:, 0], expected[:, i], atol=ATOL, rtol=0)
    assert cache.length == tgt.shape[1]


def _hf_greedy(hf, src, src_mask, n: int, bos: int, eos: int, pad: int) -> torch.Tensor:
    gen = transformers.GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=n, min_length=0, decoder_start_token_id=bos,
        eos_token_id=eos, pad_token_id=pad, forced_bos_token_id=None, forced_eos_token_id=None,
        no_repeat_ngram_size=0, repetition_penalty=1.0)
    with torch.no_grad():
        out = hf.generate(input_ids=src, attention_mask=src_mask.long(), generation_config=gen)
    return out[:, 1:]  # drop the decoder start token, as polytask's generate does


def test_greedy_generation_matches_hf(pair):
    name, hf, _ = pair
    hf64 = hf.to(torch.float64)  # fp64 on both sides: no argmax near-ties decided by rounding
    try:
        model = from_hf(hf64)
        c = model.config
        src, src_mask, _ = _batch(4, 10, 1, c.pad_id, c.bos_id, seed=11)
        ours = generate(model, src, src_mask, max_new_tokens=12, method="greedy",
                        bos_id=c.bos_id, eos_id=c.eos_id, pad_id=c.pad_id)
        theirs = _hf_greedy(hf64, src, src_mask, 12, c.bos_id, c.eos_id, c.pad_id)
        assert torch.equal(ours, theirs)
        assert len(set(ours[:, 0].tolist())) > 1  # rows differ: the source really steers decoding
        # second run with an "eos" the model emits early in row 0, so rows finish at different steps
        eos = int(ours[0, 2])
        ours = generate(model, src, src_mask, max_new_tokens=12, bos_id=c.bos_id, eos_id=eos,
                        pad_id=c.pad_id)
        theirs = _hf_greedy(hf64, src, src_mask, 12, c.bos_id, eos, c.pad_id)
        assert (ours == eos).any() and torch.equal(ours, theirs)
    finally:
        hf.to(torch.float32)


def test_directory_and_state_dict_sources(pair, tmp_path):
    name, hf, model = pair
    hf.save_pretrained(tmp_path)
    src, src_mask, tgt = _batch(2, 8, 5, model.config.pad_id, model.config.bos_id, seed=5)
    expected = _hf_logits(hf, src, src_mask, tgt)
    ones = torch.ones_like(tgt, dtype=torch.bool)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for loaded in (from_hf(tmp_path), from_hf(str(tmp_path / "sharded")),
                   from_hf(hf.state_dict(), hf.config), from_hf((hf.state_dict(), hf.config.to_dict()))):
        with torch.no_grad():
            torch.testing.assert_close(loaded(src, tgt, src_mask, ones), expected, atol=ATOL, rtol=0)


def test_scaled_output_with_untied_head():
    """T5 config that scales decoder outputs (v1.0 style) but has its own LM head: the loader
    folds d_model**-0.5 into the head instead of needing a config option."""
    hf = _t5("v1.0")
    hf.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, 16))
    assert hf.config.scale_decoder_outputs
    model = from_hf(hf)
    assert not model.config.tie_embeddings and not model.config.rescale_tied_output
    src, src_mask, tgt = _batch(2, 8, 5, 0, 0, seed=6)
    with torch.no_grad():
        got = model(src, tgt, src_mask, torch.ones_like(tgt, dtype=torch.bool))
    torch.testing.assert_close(got, _hf_logits(hf, src, src_mask, tgt), atol=ATOL, rtol=0)


def test_position_bias_or_table_matters(pair):
    """Sensitivity: disturbing the position parameters breaks parity, so they are really used."""
    name, hf, _ = pair
    model = from_hf(hf)
    src, src_mask, tgt = _batch(2, 12, 6, model.config.pad_id, model.config.bos_id, seed=9)
    with torch.no_grad():
        for p in model.encoder.positions.parameters():
            # random, not a constant: softmax and layer norms ignore a constant shift
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        got = model(src, tgt, src_mask, torch.ones_like(tgt, dtype=torch.bool))
    assert (got - _hf_logits(hf, src, src_mask, tgt)).abs().max() > 1e-2


def test_bad_tensors_are_listed():
    hf = _t5("v1.0")
    state = dict(hf.state_dict())
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(2)
    state["decoder.final_layer_norm.weight"] = torch.ones(17)
    with pytest.raises(ValueError) as err:
        from_hf(state, hf.config)
    msg = str(err.value)
    assert "missing tensors (polytask names): encoder.layers.1.ffn.wo.weight" in msg
    assert "unexpected tensors: encoder.block.0.layer.0.SelfAttention.extra.weight" in msg
    assert "decoder.norm.weight: source (17,) vs model (16,)" in msg


def test_unsupported_sources_name_the_choices():
    hf = _t5("v1.0")
    config = hf.config.to_dict()
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; choose one of t5, bart"):
        from_hf(hf.state_dict(), {**config, "model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"feed_forward_proj = 'gated-relu'.*choose one of"):
        from_hf(hf.state_dict(), {**config, "feed_forward_proj": "gated-relu", "dense_act_fn": "relu"})
    with pytest.raises(ValueError, match="needs its Hugging Face config"):
        from_hf(hf.state_dict())
    bart = _bart().config.to_dict()
    with pytest.raises(ValueError, match=r"decoder_ffn_dim"):
        from_hf({}, {**bart, "decoder_ffn_dim": 8})
