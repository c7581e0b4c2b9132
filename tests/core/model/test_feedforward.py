"""Feed-forward blocks against the formulas of Vaswani et al. 2017 and Shazeer 2020."""
import math

import pytest
import torch

from polytask.core.model.config import ModelConfig
from polytask.core.model.feedforward import GatedFeedForward, FeedForward, build_feedforward


def _gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):  # Hendrycks & Gimpel 2016, eq. for the tanh approximation
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


CLOSED = {
    "relu": lambda x: x.clamp(min=0),
    "gelu": _gelu_erf,
    "gelu_tanh": _gelu_tanh,
    "swiglu": lambda x: x * torch.sigmoid(x),
    "geglu": _gelu_erf,
    "geglu_tanh": _gelu_tanh,
}


def _affine(x, lin):
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)


@pytest.mark.parametrize("activation", list(CLOSED))
@pytest.mark.parametrize("bias", [True, False])
def test_feedforward_matches_formula(activation, bias):
    cfg = ModelConfig(d_model=6, n_heads=2, d_ff=10, activation=activation, bias=bias, dropout=0.0)
    ffn = build_feedforward(cfg).double()
    for p in ffn.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    act = CLOSED[activation]
    if activation in ("swiglu", "geglu", "geglu_tanh"):
        assert isinstance(ffn, GatedFeedForward)
        expected = _affine(act(_affine(x, ffn.wi_0)) * _affine(x, ffn.wi_1), ffn.wo)
    else:
        assert isinstance(ffn, FeedForward)
        expected = _affine(act(_affine(x, ffn.wi)), ffn.wo)
    torch.testing.assert_close(ffn(x), expected)
    assert any(p.dim() == 1 for p in ffn.parameters()) == bias


def test_no_bias_means_no_bias_parameters():
    ffn = build_feedforward(ModelConfig(d_model=4, n_heads=2, d_ff=8, activation="swiglu", bias=False))
    assert [n for n, _ in ffn.named_parameters()] == ["wi_0.weight", "wi_1.weight", "wo.weight"]


def test_bad_activation_names_the_choices():
    with pytest.raises(ValueError, match="'swish'.*relu"):
        FeedForward(4, 8, "swish")
    with pytest.raises(ValueError, match="'relu' is not gated"):
        GatedFeedForward(4, 8, "relu")
