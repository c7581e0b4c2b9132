"""The chunked LM-head + cross-entropy agrees with its twin: F.linear, then smoothed_nll."""
import pytest
import torch
import torch.nn.functional as F

from polytask.core.data.batch import IGNORE_INDEX
from polytask.losses.cross_entropy import smoothed_nll
from polytask.losses.linear_ce import default_chunk, linear_cross_entropy


def _case(n=4, t=7, d=10, v=13, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, dtype=dtype, generator=g, requires_grad=True)
    weight = torch.randn(v, d, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(v, dtype=dtype, generator=g, requires_grad=True) if bias else None
    target = torch.randint(0, v, (n, t), generator=g)
    target[0, 5:] = IGNORE_INDEX
    target[2, :] = IGNORE_INDEX
    token_weight = torch.rand(n, t, dtype=dtype, generator=g)
    return hidden, weight, b, target, token_weight


def _twin(hidden, weight, b, target, token_weight, smoothing):
    loss, _ = smoothed_nll(F.linear(hidden, weight, b), target, smoothing=smoothing)
    return (token_weight * loss).sum()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 64])   # one row, ragged last chunk, a single chunk
def test_values_and_gradients_match_the_twin(smoothing, bias, chunk):
    hidden, weight, b, target, tw = _case(bias=bias)
    ours = linear_cross_entropy(hidden, weight, b, target, tw, smoothing=smoothing, chunk=chunk)
    ref = _twin(hidden, weight, b, target, tw, smoothing)
    torch.testing.assert_close(ours, ref)
    inputs = [x for x in (hidden, weight, b) if x is not None]
    for g_ours, g_ref in zip(torch.autograd.grad(3.0 * ours, inputs),
                             torch.autograd.grad(3.0 * ref, inputs)):
        torch.testing.assert_close(g_ours, g_ref)


def test_matches_torch_cross_entropy_token_mean_in_float32():
    hidden, weight, b, target, _ = _case(n=8, t=33, d=32, v=301, dtype=torch.float32)
    n_tok = (target != IGNORE_INDEX).sum()
    tw = torch.full(target.shape, 1.0) / n_tok
    ours = linear_cross_entropy(hidden, weight, b, target, tw, smoothing=0.1, chunk=50)
    ref = F.cross_entropy(F.linear(hidden, weight, b).reshape(-1, 301), target.reshape(-1),
                          ignore_index=IGNORE_INDEX, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, (hidden, weight, b)),
                             torch.autograd.grad(ref, (hidden, weight, b))):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_gradcheck():
    hidden, weight, b, target, tw = _case(n=3, t=6, d=4, v=5)
    assert torch.autograd.gradcheck(
        lambda h, w, bb: linear_cross_entropy(h, w, bb, target, tw, smoothing=0.1, chunk=2),
        (hidden, weight, b))


def test_frozen_weight_and_no_grad_paths():
    hidden, weight, b, target, tw = _case()
    ref = _twin(hidden, weight, b, target, tw, 0.0)
    frozen = weight.detach()
    ours = linear_cross_entropy(hidden, frozen, None if b is None else b.detach(), target, tw)
    g_ours, = torch.autograd.grad(ours, hidden)
    g_ref, = torch.autograd.grad(_twin(hidden, frozen, b.detach(), target, tw, 0.0), hidden)
    torch.testing.assert_close(g_ours, g_ref)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, b, target, tw), ref.detach())


def test_every_row_ignored_gives_a_connected_zero():
    hidden, weight, b, target, tw = _case()
    target.fill_(IGNORE_INDEX)
    loss = linear_cross_entropy(hidden, weight, b, target, tw)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_bad_targets_and_shapes_are_named():
    hidden, weight, b, target, tw = _case()
    target[1, 1] = 13
    with pytest.raises(ValueError, match=r"\[13\] are outside \[0, 13\)"):
        linear_cross_entropy(hidden, weight, b, target, tw)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden[:, :3], weight, b, target, tw)


def test_default_chunk_keeps_a_chunk_of_logits_bounded():
    assert default_chunk(8000) * 8000 <= 1 << 22
    assert default_chunk(10**7) == 16
