"""polytask.core.decoding.step.DecodingStep (an accelerated run) against its twin, the plain
modules (``model.decode``): same logits step by step, same tokens from greedy, sampling and
beam search, across the model configurations; declined where the module path must run."""
import contextlib
import copy

import pytest
import torch

from polytask.attention import native
from polytask.attention.native import MAX_ROWS, SmallRowsLinear, kernels, single_query_fits
from polytask.core.decoding import step as decoding_step
from polytask.core.model.config import ModelConfig
from polytask.core.decoding.step import DecodingStep
from polytask.core.accelerate import accelerated
from polytask.core.decoding.generation import generate, start_decoding
from polytask.attention.multihead import MultiHeadAttention
from polytask.core.peft import apply_peft
from polytask.core.model.transformer import EncoderDecoder

PAD, BOS, EOS = 0, 2, 3

CONFIGS = {
    "default": {},
    "post_norm": dict(norm_position="post", positions="sinusoidal", activation="relu"),
    "t5": dict(norm="rmsnorm", positions="relative", activation="relu", bias=False,
               scale_attention=False, rescale_tied_output=True),
    "rope_gqa": dict(positions="rope", n_kv_heads=1, activation="gelu_tanh"),
    "gated_bart": dict(activation="swiglu", embedding_norm=True, position_offset=2,
                       scale_embeddings=True, lm_head_bias=True, tie_embeddings=False),
}


def model_of(d_model: int = 32, seed: int = 0, **overrides) -> EncoderDecoder:
    torch.manual_seed(seed)
    options = dict(vocab_size=40, d_model=d_model, n_heads=2, n_encoder_layers=1,
                   n_decoder_layers=2, d_ff=2 * d_model, dropout=0.0, init_std=0.3,
                   max_length=64, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    return EncoderDecoder(ModelConfig(**{**options, **overrides})).eval()


def sources(vocab: int = 40) -> torch.Tensor:
    src = torch.randint(4, vocab, (4, 9), generator=torch.Generator().manual_seed(1))
    src[1, 5:] = PAD   # padded rows: the cross-attention mask
    src[3, 2:] = PAD
    return src


def step_logits(model: EncoderDecoder, src: torch.Tensor, steps: int, fast: bool) -> torch.Tensor:
    """Logits of ``steps`` greedy steps, ``(steps, b, V)``: accelerated with DecodingStep, or
    the plain modules."""
    with torch.no_grad(), accelerated(model, inference=True) if fast else contextlib.nullcontext():
        state = start_decoding(model, src, None, PAD, use_cache=True, step=fast)
        tokens = torch.full((src.shape[0], 1), BOS)
        out = []
        for _ in range(steps):
            logits = state.next_token_logits(tokens)
            out.append(logits)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        assert (state.step is not None) == fast   # the step was (not) taken
    return torch.stack(out)


@pytest.mark.parametrize("name", CONFIGS)
def test_step_logits_equal_module_path(name):
    model = model_of(**CONFIGS[name])
    fast, slow = (step_logits(model, sources(), 6, fast) for fast in (True, False))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native", "onednn"])
@pytest.mark.parametrize("name", ["default", "t5"])
def test_step_logits_equal_at_d_model_256(name, native, monkeypatch):
    """d_model 256: the step's projections and attentions run the native kernels
    (polytask.attention.native), or, with them switched off, oneDNN with packed weights
    (polytask.attention.packed) and SDPA."""
    if not native:
        monkeypatch.setenv("POLYTASK_NATIVE", "0")
    elif kernels() is None:
        pytest.skip("native kernels not built")
    model = model_of(d_model=256, **CONFIGS[name])
    fast, slow = (step_logits(model, sources(), 4, fast) for fast in (True, False))
    # the plain modules sum with MKL, the step with the native kernels or oneDNN: at d_model
    # 256 the two orders differ by up to ~1e-5 of the logits' scale (measured: 7e-6 default, 2e-5 t5)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=3e-5 * float(slow.abs().max()))


def test_step_takes_the_native_kernels_where_built():
    if kernels() is None:
        pytest.skip("native kernels not built")
    with torch.no_grad():
        step = DecodingStep.build(model_of())
        gqa = DecodingStep.build(model_of(**CONFIGS["rope_gqa"]))
    layer = step.layers[0]
    assert all(isinstance(f, SmallRowsLinear) for f in (
        layer.qkv, layer.self_out, layer.cross_q, layer.cross_out, layer.ffn_in, layer.ffn_out))
    assert layer.native == (True, True)
    q, kv = torch.randn(2, 2, 1, 16), torch.randn(2, 1, 5, 16)   # grouped heads: SDPA
    assert gqa.layers[0].native == (True, True) and not single_query_fits(q, kv, kv)


BLOCK_CONFIGS = {
    "default": {},
    "rmsnorm_relu_no_bias": dict(norm="rmsnorm", activation="relu", bias=False),
    "gelu_tanh_sinusoidal": dict(activation="gelu_tanh", positions="sinusoidal"),
}


@pytest.mark.parametrize("d_model", [32, 256])
@pytest.mark.parametrize("name", BLOCK_CONFIGS)
def test_native_blocks_equal_the_python_step_and_the_modules(name, d_model, monkeypatch):
    """Unpadded sources (no cross-attention mask), pre-norm, no position bias or RoPE: each
    sublayer runs as one native block. Same kernels, same order: the same numbers as the
    step's Python path; the module path agrees to rounding."""
    if kernels() is None:
        pytest.skip("native kernels not built")
    model = model_of(d_model=d_model, **BLOCK_CONFIGS[name])
    src = torch.randint(4, 40, (5, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert all(layer.blocks for layer in DecodingStep.build(model).layers)
    blocks = step_logits(model, src, 6, True)
    monkeypatch.setattr(decoding_step._LayerStep, "_blocks_fit", lambda self: False)
    python = step_logits(model, src, 6, True)
    assert torch.equal(blocks, python)
    # other kernels (MKL, SDPA) sum in another order: rounding grows with d_model
    plain = step_logits(model, src, 6, False)
    torch.testing.assert_close(blocks, plain, rtol=1e-4, atol=3e-5 * float(plain.abs().max()))


def test_blocks_not_taken_where_they_do_not_fit():
    if kernels() is None:
        pytest.skip("native kernels not built")
    with torch.no_grad():
        for name in ("post_norm", "rope_gqa", "gated_bart"):
            step = DecodingStep.build(model_of(**CONFIGS[name]))
            assert not any(layer.blocks for layer in step.layers), name
        custom = model_of()
        for layer in custom.decoder.layers:   # an attention the step does not know
            layer.self_attn.__class__ = CustomAttention
        step = DecodingStep.build(custom)
        assert not any(layer.blocks for layer in step.layers)
        assert step.layers[0].qkv is None


class CustomAttention(MultiHeadAttention):
    """A user's subclass: the step must call it as a module, whatever it overrides."""


def test_fp64_model_neither_builds_nor_takes_the_kernels(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("kernels built for fp64"))
    model = model_of(d_model=64).double()
    with torch.no_grad():
        layer = DecodingStep.build(model).layers[0]
    assert layer.native == (False, False) and not layer.blocks
    fast, slow = generate_both(model)
    assert torch.equal(fast, slow)


def test_beam_search_past_the_native_row_limit(monkeypatch):
    """4 sources x 17 beams = 68 rows > MAX_ROWS: the step's linears fall back to oneDNN."""
    if kernels() is None:
        pytest.skip("native kernels not built")
    assert 4 * 17 > MAX_ROWS
    made = []
    original = decoding_step.reusable_linear
    monkeypatch.setattr(decoding_step, "reusable_linear",
                        lambda *args: made.append(args) or original(*args))
    fast, slow = generate_both(model_of(d_model=256), method="beam", num_beams=17)
    assert torch.equal(fast, slow)
    assert len(made) == 6 * 2   # every linear of both decoder layers, made on first need


def generate_both(model, **kwargs):
    """generate's tokens with and without DecodingStep (sampling: the same generator seed)."""
    out = []
    for fast in (True, False):
        if kwargs.get("method") == "sample":
            kwargs["generator"] = torch.Generator().manual_seed(3)
        out.append(generate(model, sources(), max_new_tokens=8, eos_id=EOS, accelerate=fast,
                            **kwargs))
    return out


@pytest.mark.parametrize("kwargs", [
    dict(method="greedy"),
    dict(method="beam", num_beams=3),
    dict(method="sample", top_k=5),
], ids=["greedy", "beam", "sample"])
def test_generate_same_tokens(kwargs):
    fast, slow = generate_both(model_of(**CONFIGS["t5"]), **kwargs)
    assert torch.equal(fast, slow)
    assert fast.shape[1] > 1


def test_lora_wrapped_projections_use_their_modules():
    """LoRA's q/v wrappers are not plain Linears: the step calls the attention module there."""
    model = model_of()
    apply_peft(model, "lora", r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)   # zero-initialised B would hide a skipped adapter
    model.eval()
    fast, slow = (step_logits(model, sources(), 5, fast) for fast in (True, False))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert not torch.allclose(step_logits(plain, sources(), 5, True), fast)


def test_declined_where_the_module_path_must_run():
    model = model_of()
    with torch.no_grad():
        assert isinstance(DecodingStep.build(model), DecodingStep)
        model.decoder.layers[0].ffn.train()
        assert DecodingStep.build(model) is None          # a module in training mode
        model.eval()
        handle = model.decoder.layers[1].cross_attn.register_forward_hook(lambda *a: None)
        assert DecodingStep.build(model) is None          # a hook the step would skip
        handle.remove()
        assert DecodingStep.build(object()) is None       # not an EncoderDecoder
    assert DecodingStep.build(model) is None              # autograd on


def test_hooks_still_fire_during_generate():
    model = model_of()
    calls = []
    model.decoder.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    generate(model, sources(), max_new_tokens=5, eos_id=-1)
    assert len(calls) == 5   # every step through the module, none skipped


def test_source_row_without_real_tokens():
    """An all-padding source row: its cross-attention returns zeros on both paths."""
    model = model_of(**CONFIGS["default"])
    src = sources()
    src[2] = PAD
    with torch.no_grad():
        out = []
        for fast in (True, False):
            with accelerated(model, inference=True) if fast else contextlib.nullcontext():
                state = start_decoding(model, src, None, PAD, use_cache=True, step=fast)
                out.append(state.next_token_logits(torch.full((4, 1), BOS)))
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_a_custom_attention_runs_as_its_module():
    """A subclass of MultiHeadAttention is called as a module by the step (not fused)."""
    model = model_of()
    for layer in model.decoder.layers:
        layer.self_attn.__class__ = CustomAttention
    with torch.no_grad():
        assert DecodingStep.build(model).layers[0].qkv is None
    fast, slow = (step_logits(model, sources(), 4, fast) for fast in (True, False))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_the_step_runs_only_where_asked():
    """``step=False`` (and ``accelerate=False`` in generate) never builds a DecodingStep."""
    model = model_of()
    with torch.no_grad():
        assert start_decoding(model, sources(), None, PAD, use_cache=True).step is None
        assert start_decoding(model, sources(), None, PAD, use_cache=True, step=True).step is not None
        assert start_decoding(model, sources(), None, PAD, use_cache=False, step=True).step is None
