"""``linear`` (oneDNN with a pre-packed weight) agrees with ``F.linear``, its twin, and
is taken only where it is safe: in a ``packed_weights`` block, no autograd, CPU fp32, no
autocast; stale packs are never used."""
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polytask.attention.packed as packed
from polytask.attention.packed import (apply_linear, linear, packable, packed_weight,
                              packed_weights)

needs_onednn = pytest.mark.skipif(not packed._AVAILABLE, reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def _pack_small_weights(monkeypatch):
    """The tests' small weights would stay with F.linear (MIN_WEIGHT_NUMEL); pack them."""
    monkeypatch.setattr(packed, "MIN_WEIGHT_NUMEL", 0)


@needs_onednn
def test_small_weights_are_not_packed_by_default(monkeypatch):
    monkeypatch.setattr(packed, "MIN_WEIGHT_NUMEL", 256 * 256)
    x = torch.randn(4, 256)
    with torch.no_grad(), packed_weights():
        assert not packable(x, torch.randn(255, 256))
        assert packable(x, torch.randn(256, 256))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (16, 48), (3, 5, 48), (2, 3, 4, 48), (0, 48)])
def test_values_equal_f_linear(bias, shape):
    torch.manual_seed(0)
    w, b = torch.randn(301, 48), (torch.randn(301) if bias else None)
    x = torch.randn(*shape)
    with torch.no_grad(), packed_weights():
        assert packable(x, w, b)
        plain, packed_out = linear(x, w, b), linear(x, w, b)
    for out in (plain, packed_out):
        assert out.shape == (*shape[:-1], 301) and out.dtype == torch.float32
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_strided_input_and_fp64_reference():
    torch.manual_seed(1)
    w, b = torch.randn(64, 96), torch.randn(64)
    x = torch.randn(96, 10).t()                       # (10, 96), not contiguous
    with torch.no_grad(), packed_weights():
        outs = [linear(x, w, b) for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out.double(), F.linear(x.double(), w.double(), b.double()),
                                   rtol=1e-5, atol=1e-5)


def _twin_grads(fn, x, lin, weight):
    out = fn(x)
    (out * weight).sum().backward()
    grads = [t.grad.clone() for t in (x, lin.weight, lin.bias)]
    for t in (x, lin.weight, lin.bias):
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("shape", [(4, 48), (2, 3, 48)])
def test_with_autograd_values_and_gradients_equal_f_linear(shape):
    """The training path: oneDNN forward, F.linear's backward."""
    torch.manual_seed(2)
    lin = nn.Linear(48, 64)
    x = torch.randn(*shape, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 64)
    assert not packable(x, lin.weight, lin.bias)            # nothing is packed for training
    out, grads = _twin_grads(lambda t: apply_linear(lin, t), x, lin, upstream)
    ref, ref_grads = _twin_grads(lin, x, lin, upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    if packed._AVAILABLE:
        assert type(apply_linear(lin, x).grad_fn).__name__ == "_OneDNNLinearBackward"


def test_frozen_weight_and_create_graph():
    """A frozen layer gives only the input gradient; a second-order gradient (create_graph)
    flows through the backward like F.linear's."""
    torch.manual_seed(3)
    lin = nn.Linear(48, 64)
    x = torch.randn(5, 48, requires_grad=True)
    results = []
    for fn in (lambda t: apply_linear(lin, t), lin):
        (gx,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), lin.weight)
        results.append((gx.detach(), gw))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    lin.requires_grad_(False)
    out = apply_linear(lin, x)
    out.sum().backward()
    assert lin.weight.grad is None
    torch.testing.assert_close(x.grad, torch.ones(5, 64) @ lin.weight)


def test_falls_back_where_it_must_not_apply():
    w, x = torch.randn(6, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert not packable(x, w)                                # outside a block
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), packed_weights():
        assert not packable(x.double(), w.double())              # not fp32
        assert not packable(x[0], w)                             # 1-d input
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not packable(x, w)
            assert linear(x, w).dtype == torch.bfloat16  # autocast's F.linear
        assert torch.equal(linear(x.double(), w.double()), F.linear(x.double(), w.double()))
        torch.backends.mkldnn.enabled = False                     # the user's switch
        try:
            assert not packable(x, w)
            assert torch.equal(linear(x, w), F.linear(x, w))
        finally:
            torch.backends.mkldnn.enabled = True
    with packed_weights():   # grad mode on but nothing needs a gradient: it may pack
        assert packable(x, w) == packed._AVAILABLE


def test_reusable_linear_equals_f_linear():
    torch.manual_seed(7)
    w, b = torch.randn(300, 40), torch.randn(300)
    head = packed.reusable_linear(w, b)
    for rows in (1, 17):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(head(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x64 = torch.randn(3, 40, dtype=torch.float64)                 # not oneDNN's: F.linear
    head64 = packed.reusable_linear(w.double(), b.double())
    assert torch.equal(head64(x64), F.linear(x64, w.double(), b.double()))


@needs_onednn
def test_pack_is_rebuilt_when_the_weight_changes():
    torch.manual_seed(3)
    lin = nn.Linear(16, 24)
    x = torch.randn(5, 16)
    with torch.no_grad(), packed_weights():
        assert packed_weight(lin.weight) is lin.weight               # first use: as it is
        first = packed_weight(lin.weight)                            # second: packed
        assert first is not lin.weight and first.layout != torch.strided
        with packed_weights():                                       # nested: same copies
            assert packed_weight(lin.weight) is first
        assert packed_weight(lin.weight) is first
        lin.weight.mul_(2.0)                                         # in place: new version
        for _ in range(2):                                           # plain, then packed
            torch.testing.assert_close(apply_linear(lin, x), lin(x), rtol=1e-5, atol=1e-5)
        assert packed_weight(lin.weight) is not first
        lin.weight.data = torch.randn(24, 16)                        # new storage, same tensor
        for _ in range(2):
            torch.testing.assert_close(apply_linear(lin, x), lin(x), rtol=1e-5, atol=1e-5)
    assert packed._STATE.cache is None                               # dropped with the block


@needs_onednn
def test_a_fused_optimizer_step_between_blocks_is_seen():
    """A fused AdamW step does not bump the version counter; packs must not outlive a block."""
    torch.manual_seed(4)
    lin = nn.Linear(16, 24)
    x = torch.randn(5, 16)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.5, fused=True)
    with torch.no_grad(), packed_weights():
        apply_linear(lin, x)
        before = apply_linear(lin, x)                                # the packed copy
    lin(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad(), packed_weights():
        apply_linear(lin, x)
        after = apply_linear(lin, x)
        torch.testing.assert_close(after, lin(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_other_modules_are_called():
    class Twice(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    lin = Twice(4, 3)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(apply_linear(lin, x), lin(x))
        hooked = nn.Linear(4, 3)
        hooked.register_forward_hook(lambda m, i, o: o + 1)
        assert torch.equal(apply_linear(hooked, x), hooked(x))


@needs_onednn
def test_inference_mode_weights():
    with torch.inference_mode(), packed_weights():
        w, x = torch.randn(7, 9), torch.randn(2, 9)
        for _ in range(2):
            torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_activation_inside_the_gemm_equals_linear_then_activation(activation):
    torch.manual_seed(5)
    lin = nn.Linear(32, 64)
    x = torch.randn(3, 7, 32)
    twin = packed.ACTIVATIONS[activation][1](lin(x))
    with torch.no_grad(), packed_weights():
        outs = [apply_linear(lin, x, activation) for _ in range(2)]      # plain, then packed
    for out in outs:
        torch.testing.assert_close(out, twin.detach(), rtol=1e-5, atol=1e-5)
    # outside a block, and for a module that is not a plain Linear: linear, then activation
    assert torch.equal(apply_linear(lin, x, activation), twin)
    hooked = nn.Linear(32, 64)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert torch.equal(apply_linear(hooked, x, activation),
                       packed.ACTIVATIONS[activation][1](hooked(x)))


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*relu, gelu, gelu_tanh"):
        linear(torch.randn(2, 3), torch.randn(4, 3), activation="swish")


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "swiglu"])
def test_feedforward_in_a_block_equals_the_feedforward(activation):
    from polytask.core.model.config import ModelConfig
    from polytask.core.model.feedforward import build_feedforward
    torch.manual_seed(6)
    ff = build_feedforward(ModelConfig(d_model=32, d_ff=64, n_heads=2, activation=activation,
                                       vocab_size=50)).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = ff(x)
        with packed_weights():
            outs = [ff(x) for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
