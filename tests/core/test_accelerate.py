"""polytask.core.accelerate.accelerated: the fast twins in place of the plain modules for a
block, and back; the same values and gradients as the plain modules; nothing of the model's
state changes; the teaching modules themselves stay plain PyTorch."""
from pathlib import Path

import pytest
import torch
from torch import nn

from polytask.attention.fast import FastMultiHeadAttention
from polytask.attention.multihead import MultiHeadAttention
from polytask.attention.packed import FastLinear
from polytask.core.accelerate import (FastFeedForward, FastGatedFeedForward, accelerated,
                                      is_accelerated)
from polytask.core.model.config import ModelConfig
from polytask.core.model.feedforward import FeedForward, GatedFeedForward
from polytask.core.model.transformer import EncoderDecoder
from polytask.core.data.tasks import TaskSpec
from polytask.heads import SharingConfig, build_model

ROOT = Path(__file__).resolve().parents[2]


def model_of(dtype=torch.float32, **overrides) -> EncoderDecoder:
    torch.manual_seed(0)
    options = dict(vocab_size=300, d_model=256, n_heads=4, n_encoder_layers=2,
                   n_decoder_layers=2, d_ff=512, dropout=0.0, max_length=32)
    return EncoderDecoder(ModelConfig(**{**options, **overrides})).to(dtype)


def kinds(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def test_the_block_swaps_in_the_twins_and_back():
    model = model_of(activation="swiglu")
    before = kinds(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with accelerated(model) as same:
        assert same is model
        during = kinds(model)
        assert during["encoder.layers.0.self_attn"] is FastMultiHeadAttention
        assert during["decoder.layers.1.ffn"] is FastGatedFeedForward
        assert during["lm_head"] is FastLinear
        assert during["encoder.layers.0.self_attn.q_proj"] is nn.Linear   # fused by the MHA
        assert is_accelerated(model.decoder.layers[0].cross_attn)
        assert list(model.state_dict()) == list(state)
    assert kinds(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_an_error_in_the_block_still_restores_the_plain_modules():
    model = model_of()
    before = kinds(model)
    with pytest.raises(RuntimeError, match="boom"):
        with accelerated(model):
            raise RuntimeError("boom")
    assert kinds(model) == before


def test_nested_blocks_leave_the_outer_ones_twins():
    model = model_of()
    with accelerated(model):
        with accelerated(model, inference=True):
            pass
        assert type(model.decoder.layers[0].ffn) is FastFeedForward   # still the outer block's
    assert type(model.decoder.layers[0].ffn) is FeedForward


@pytest.mark.parametrize("overrides", [{}, {"activation": "relu", "bias": False},
                                       {"activation": "swiglu"}, {"n_kv_heads": 2}],
                         ids=["gelu", "relu_no_bias", "swiglu", "gqa"])
def test_values_and_gradients_equal_the_plain_modules(overrides):
    """fp32 at d_model 256: the fast twins run oneDNN (another order of sums than MKL)."""
    model = model_of(**overrides)
    src = torch.randint(4, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(4, 300, (3, 7), generator=torch.Generator().manual_seed(2))
    src[1, 6:] = 0

    def run():
        model.zero_grad()
        logits = model(src, tgt)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    plain, plain_grads = run()
    with accelerated(model):
        fast, fast_grads = run()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    for f, p in zip(fast_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-3, atol=1e-6)
    with torch.no_grad(), accelerated(model, inference=True):      # packed weights
        torch.testing.assert_close(model(src, tgt), plain, rtol=1e-4, atol=1e-5)


def test_fp64_values_and_gradients_equal_to_rounding():
    """fp64 never takes oneDNN: the twins differ from the plain modules only by the fused
    q/k/v product."""
    model = model_of(torch.float64, d_model=32, n_heads=2, d_ff=64)
    src, tgt = torch.randint(4, 300, (2, 6)), torch.randint(4, 300, (2, 5))
    plain = model(src, tgt)
    g_plain = torch.autograd.grad(plain.sum(), list(model.parameters()))
    with accelerated(model):
        fast = model(src, tgt)
        g_fast = torch.autograd.grad(fast.sum(), list(model.parameters()))
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    for f, p in zip(g_fast, g_plain):
        torch.testing.assert_close(f, p, rtol=1e-10, atol=1e-12)


def test_a_multitask_model_gets_its_output_projections_but_not_its_heads_accelerated():
    torch.manual_seed(0)
    tasks = [TaskSpec("gen"), TaskSpec("cls", kind="classification", labels=["a", "b"])]
    config = ModelConfig(vocab_size=40, d_model=16, n_heads=2, n_encoder_layers=1,
                         n_decoder_layers=1, d_ff=32, dropout=0.0, max_length=32)
    model = build_model(config, tasks, SharingConfig(strategy="none", classifier_hidden=8))
    with accelerated(model):
        found = kinds(model)
        assert found["slots.lm_head.0"] is FastLinear
        assert all(t is not FastLinear for n, t in found.items() if n.startswith("heads."))
        assert type(model.for_task("gen").lm_head) is FastLinear      # the views share modules
    assert all(t is not FastLinear for t in kinds(model).values())


def test_a_duck_typed_model_is_left_alone():
    class Scripted:
        config = None
    with accelerated(Scripted()) as model:
        assert isinstance(model, Scripted)


@pytest.mark.parametrize("path", ["attention/multihead.py", "attention/functional.py",
                                  "attention/reference.py", "core/model/feedforward.py",
                                  "core/model/layers.py", "core/model/transformer.py"])
def test_the_teaching_modules_are_plain_pytorch(path):
    """The CPU accelerations live in attention/packed.py, attention/fast.py, attention/native.py
    and core/accelerate.py; the modules a student reads import none of them."""
    text = (ROOT / path).read_text()
    for name in ("packed", "polytask.attention.fast", "native", "accelerate", "apply_linear"):
        assert name not in text.replace("packed=", ""), f"{path} mentions {name}"


def test_the_twins_add_no_state():
    for plain, fast in ((MultiHeadAttention, FastMultiHeadAttention), (FeedForward, FastFeedForward),
                        (GatedFeedForward, FastGatedFeedForward), (nn.Linear, FastLinear)):
        assert fast.__bases__ == (plain,)
        assert "__init__" not in vars(fast)
