"""``MultiHeadAttention.from_torch`` copies ``nn.MultiheadAttention`` exactly in its own dtype.

A regression: the copy was built in float32, filled, then converted, so a float64 source was
rounded through float32 (weights equal only to ~1e-8, outputs off by far more than 1e-12).
The module is now built in the source's dtype before copying: every weight and bias is
bit-equal to its chunk of ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj``.
"""
import pytest
import torch
from torch import nn

from polytask.attention.multihead import MultiHeadAttention

D, H = 12, 3


def _source(dtype, bias):
    torch.manual_seed(7)
    return nn.MultiheadAttention(embed_dim=D, num_heads=H, bias=bias, batch_first=True, dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weights_and_biases_are_bit_equal(dtype, bias):
    theirs = _source(dtype, bias)
    ours = MultiHeadAttention.from_torch(theirs, backend="reference")
    projections = (ours.q_proj, ours.k_proj, ours.v_proj)
    for proj, w in zip(projections, theirs.in_proj_weight.chunk(3, dim=0)):
        assert proj.weight.dtype == dtype
        assert torch.equal(proj.weight, w)
    assert ours.out_proj.weight.dtype == dtype
    assert torch.equal(ours.out_proj.weight, theirs.out_proj.weight)
    if bias:
        for proj, b in zip(projections, theirs.in_proj_bias.chunk(3)):
            assert proj.bias.dtype == dtype
            assert torch.equal(proj.bias, b)
        assert torch.equal(ours.out_proj.bias, theirs.out_proj.bias)
    else:
        assert all(p.bias is None for p in (*projections, ours.out_proj))
    assert all(p.dtype == dtype for p in ours.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_float64_self_attention_matches_pytorch_to_1e_12(bias):
    theirs = _source(torch.float64, bias).eval()
    ours = MultiHeadAttention.from_torch(theirs, backend="reference").eval()
    b, t = 3, 7
    x = torch.randn(b, t, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 3, 5])
    pad = torch.arange(t)[None, :] >= lengths[:, None]         # torch: True = ignore this key
    with torch.no_grad():
        want, _ = theirs(x, x, x, key_padding_mask=pad, need_weights=False)
        got = ours(x, mask=~pad[:, None, None, :])              # polytask: True = may attend
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
