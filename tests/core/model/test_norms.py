"""Norms against their closed forms and against PyTorch's own modules."""
import pytest
import torch
from torch import nn

from polytask.core.model.config import ModelConfig
from polytask.core.model.norms import LayerNorm, RMSNorm, build_norm


def _randomise(*norms):
    g = torch.randn(norms[0].weight.shape)
    for m in norms:
        with torch.no_grad():
            m.weight.copy_(g)
    return g


def test_layernorm_matches_closed_form_and_torch():
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    ours, ref = LayerNorm(7, eps=1e-5).double(), nn.LayerNorm(7, eps=1e-5).double()
    g = _randomise(ours, ref).double()
    with torch.no_grad():
        ours.bias.fill_(0.3)
        ref.bias.fill_(0.3)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as in Ba et al. 2016
    closed = (x - mean) / torch.sqrt(var + 1e-5) * g + 0.3
    torch.testing.assert_close(ours(x), closed)
    torch.testing.assert_close(ours(x), ref(x))


def test_rmsnorm_matches_closed_form_and_torch():
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    ours, ref = RMSNorm(6, eps=1e-6).double(), nn.RMSNorm(6, eps=1e-6).double()
    g = _randomise(ours, ref).double()
    closed = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * g
    torch.testing.assert_close(ours(x), closed)
    torch.testing.assert_close(ours(x), ref(x))
    assert not hasattr(ours, "bias")  # no shift, no mean subtraction (Zhang & Sennrich 2019)


def test_rmsnorm_half_precision_is_computed_in_fp32():
    # A half-precision sum of squares overflows at |x| ~ 300; T5 normalises in fp32.
    x = torch.full((1, 64), 1000.0, dtype=torch.float16)
    y = RMSNorm(64)(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), torch.ones(1, 64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm, cls", [("layernorm", LayerNorm), ("rmsnorm", RMSNorm)])
def test_build_norm(norm, cls):
    m = build_norm(ModelConfig(norm=norm, d_model=8, n_heads=2, norm_eps=1e-3))
    assert isinstance(m, cls) and m.eps == 1e-3 and m.weight.shape == (8,)
