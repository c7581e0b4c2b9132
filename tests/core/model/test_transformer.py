"""EncoderDecoder invariants: causality, padding, batching, KV-cache decoding, parameter count."""
import itertools

import pytest
import torch

from polytask.core.model.config import ModelConfig
from polytask.core.model.transformer import EncoderDecoder, count_parameters

V = 23


def _cfg(**kw):
    base = dict(vocab_size=V, d_model=16, n_heads=4, d_ff=24, n_encoder_layers=2,
                n_decoder_layers=2, dropout=0.0, max_length=32, relative_buckets=8,
                relative_max_distance=16, pad_id=0, bos_id=1, eos_id=2,
                attention_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def _model(**kw):
    return EncoderDecoder(_cfg(**kw)).double().eval()


def _ids(b, L, low=3):
    return torch.randint(low, V, (b, L))


POSITIONS = ["sinusoidal", "learned", "relative", "rope", "none"]


@pytest.mark.parametrize("positions", POSITIONS)
def test_future_target_tokens_never_change_earlier_logits(positions):
    model = _model(positions=positions)
    src, tgt = _ids(2, 6), _ids(2, 5)
    changed = tgt.clone()
    changed[:, 3:] = _ids(2, 2)
    a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])  # the changed positions do change


@pytest.mark.parametrize("positions", POSITIONS)
def test_padded_source_positions_never_change_outputs(positions):
    model = _model(positions=positions, norm_position="post", embedding_norm=True)
    src, tgt = _ids(2, 7), _ids(2, 4)
    src[0, 4:] = 0
    src[1, 6:] = 0
    other = src.clone()
    other[0, 4:] = _ids(1, 3)[0]  # different ids at padded positions, same mask
    other[1, 6:] = 5
    mask = src != 0
    torch.testing.assert_close(model(src, tgt, mask), model(other, tgt, mask))


@pytest.mark.parametrize("positions", POSITIONS)
def test_example_alone_equals_example_in_padded_batch(positions):
    model = _model(positions=positions, norm="rmsnorm", activation="geglu")
    src, tgt = _ids(3, 8), _ids(3, 6)
    src[1, 5:], tgt[1, 4:] = 0, 0  # example 1 is shorter on both sides, padded with pad_id
    batch = model(src, tgt)
    alone = model(src[1:2, :5], tgt[1:2, :4])
    torch.testing.assert_close(batch[1:2, :4], alone)


@pytest.mark.parametrize("positions, norm_position",
                         [(p, "pre") for p in POSITIONS] + [("learned", "post")])
def test_incremental_decoding_equals_full_forward(positions, norm_position):
    model = _model(positions=positions, norm_position=norm_position, n_kv_heads=2,
                   position_offset=2 if positions == "learned" else 0)
    src, tgt = _ids(2, 6), _ids(2, 5)
    src[1, 4:] = 0
    src_mask = src != 0
    memory = model.encode(src, src_mask)
    full = model.logits(model.decode(tgt, memory, src_mask))
    cache = model.new_cache()
    for step in range(tgt.shape[1]):
        hidden = model.decode(tgt[:, step:step + 1], memory, src_mask, cache=cache)
        assert cache.length == step + 1
        torch.testing.assert_close(model.logits(hidden)[:, 0], full[:, step], atol=1e-10, rtol=1e-8)


def test_cache_prefill_then_steps_and_reorder():
    model = _model(positions="relative")
    src, tgt = _ids(3, 5), _ids(3, 6)
    src_mask = src != 0
    memory = model.encode(src, src_mask)
    full = model.logits(model.decode(tgt, memory, src_mask))
    cache = model.new_cache()
    model.decode(tgt[:, :3], memory, src_mask, cache=cache)  # prefill three tokens at once
    index = torch.tensor([2, 2, 0])  # beam search: keep row 2 twice and row 0
    cache.reorder(index)
    hidden = model.decode(tgt[index, 3:], memory[index], src_mask[index], cache=cache)
    torch.testing.assert_close(model.logits(hidden), full[index, 3:])


def test_t5_style_start_token_equal_to_pad_is_real():
    model = _model(positions="relative", bos_id=0)
    src, tgt = _ids(1, 4), _ids(1, 3)
    tgt[:, 0] = 0  # T5 starts decoding from the pad id
    torch.testing.assert_close(model(src, tgt), model(src, tgt, tgt_mask=torch.ones(1, 3, dtype=torch.bool)))


NORMS, ACTS = ["layernorm", "rmsnorm"], ["relu", "gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh"]


@pytest.mark.parametrize("norm, activation, positions", list(itertools.product(NORMS, ACTS, POSITIONS)))
def test_every_combination_runs_forward_and_backward(norm, activation, positions):
    cfg = _cfg(norm=norm, activation=activation, positions=positions, d_model=8, n_heads=2,
               d_ff=8, n_encoder_layers=1, n_decoder_layers=1, dropout=0.1)
    model = EncoderDecoder(cfg).train()
    logits = model(_ids(2, 5), _ids(2, 4))
    assert logits.shape == (2, 4, V)
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_tied_head_with_t5_rescaling_is_the_embedding_transpose():
    model = _model(tie_embeddings=True, rescale_tied_output=True, lm_head_bias=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    hidden = torch.randn(2, 3, 16, dtype=torch.float64)
    expected = hidden * 16 ** -0.5 @ model.embed_tokens.weight.T + model.lm_head.bias
    torch.testing.assert_close(model.logits(hidden), expected)


def test_scale_embeddings_multiplies_by_sqrt_d():
    a, b = _model(scale_embeddings=False), _model(scale_embeddings=True)
    b.load_state_dict(a.state_dict())
    ids = _ids(1, 4)
    torch.testing.assert_close(b.embed(ids), a.embed(ids) * 4.0)


def test_initialisation_is_seeded_and_follows_the_documented_scheme():
    torch.manual_seed(1)
    a = EncoderDecoder(_cfg(init_std=0.05, d_model=64, d_ff=128))
    torch.manual_seed(1)
    b = EncoderDecoder(_cfg(init_std=0.05, d_model=64, d_ff=128))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.encoder.layers[0].self_attn_norm.weight.eq(1).all()
    assert a.decoder.layers[0].ffn.wi.bias.eq(0).all()
    assert abs(a.decoder.layers[1].ffn.wo.weight.std().item() - 0.05) < 0.005


def test_bad_mask_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="src_mask must be a bool tensor of shape"):
        model(_ids(2, 4), _ids(2, 3), src_mask=torch.ones(2, 4))


COUNT_CASES = [
    {},
    {"tie_embeddings": False},
    {"tie_embeddings": False, "lm_head_bias": True},
    {"n_kv_heads": 2},
    {"n_kv_heads": 1, "d_head": 6},
    {"bias": False, "norm": "rmsnorm", "activation": "swiglu", "positions": "relative",
     "scale_attention": False, "rescale_tied_output": True},
    {"positions": "learned", "position_offset": 2, "embedding_norm": True, "norm_position": "post"},
    {"positions": "rope", "activation": "geglu_tanh", "final_norm": False},
    {"positions": "none", "activation": "gelu_tanh", "norm_position": "post", "final_norm": True},
    {"n_encoder_layers": 0, "n_decoder_layers": 3, "activation": "geglu"},
    {"n_encoder_layers": 1, "n_decoder_layers": 0, "activation": "relu", "bias": False},
]


@pytest.mark.parametrize("overrides", COUNT_CASES)
def test_count_parameters_formula_matches_the_model(overrides):
    cfg = _cfg(**overrides)
    model = EncoderDecoder(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_fast_attention_backend_agrees_with_reference(positions):
    """The model on PyTorch's fused kernel equals the hand-written reference (values, grads)."""
    ref, fast = _model(positions=positions), _model(positions=positions, attention_backend="sdpa")
    fast.load_state_dict(ref.state_dict())
    src, tgt = _ids(2, 6), _ids(2, 4)
    src[1, 3:] = 0
    a, b = ref(src, tgt), fast(src, tgt)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("positions", ["learned", "relative", "rope"])
def test_hand_written_layer_loop_from_the_docstring_equals_forward(positions):
    """The recipe in polytask.core.model.transformer's docstring (own loop over layers) reproduces forward."""
    model = _model(positions=positions, embedding_norm=True)
    src, tgt = _ids(2, 6), _ids(2, 4)
    src[0, 4:] = 0
    src_mask, tgt_mask = src != 0, torch.ones(2, 4, dtype=torch.bool)
    enc, dec = model.encoder, model.decoder
    x, p = enc.embed(model.embed(src)), enc.prepare(src_mask)
    for layer in enc.layers:
        x = layer(x, p.mask, p.position_bias, p.rope)
    memory = enc.norm(x)
    y, q = dec.embed(model.embed(tgt), start=0), dec.prepare(tgt_mask, src_mask)
    for layer in dec.layers:
        y = layer(y, memory, q.self_mask, q.cross_mask, q.position_bias, q.rope)
    torch.testing.assert_close(model.logits(dec.norm(y)), model(src, tgt, src_mask, tgt_mask))
