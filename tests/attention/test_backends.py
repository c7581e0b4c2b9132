"""Every attention backend obeys the contract of ``scaled_dot_product_attention``.

Two outside references for each backend, values and gradients of q, k, v:
* an fp64 oracle written out below from the equation (Vaswani et al. 2017, eq. 1) with the
  mask built position by position, independent of ``attention/``;
* PyTorch's ``F.scaled_dot_product_attention`` (whose boolean mask also means True = attend),
  on the rows it defines (it returns NaN for rows that may attend to nothing).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from polytask.attention.functional import BACKENDS, scaled_dot_product_attention

BACKEND_NAMES = ["reference", "chunked", "sdpa"]


def _need(backend: str) -> None:
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} is not registered in polytask.attention.functional.BACKENDS")


def _full_mask(mask, causal, b, h, lq, lk):
    """(b, h, lq, lk) bool: the user mask AND'ed with a bottom-right causal mask, by position."""
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if mask is not None:
        allowed &= mask.expand(b, h, lq, lk)
    if causal:
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        allowed &= j - i <= lk - lq  # key j is at most (lk - lq) ahead of query i
    return allowed


def _oracle(q, k, v, allowed, bias=None, scale=None):
    """softmax(q kᵀ·scale + bias) v in fp64; a row with no allowed key gives zeros."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * scale + (0 if bias is None else bias)
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all -inf rows -> NaN -> 0
    return w @ v


def _inputs(b, h, lq, lk, d, e, hk=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    hk = h if hk is None else hk
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype),
            torch.randn(b, hk, lk, d, generator=g, dtype=dtype),
            torch.randn(b, hk, lk, e, generator=g, dtype=dtype))


def _value_and_grads(fn, q, k, v, grad_out, extra=()):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *extra)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _padding(b, lk, lengths):
    return (torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


# Lq=37, Lk=53, head size 24, value size 40 (the odd sizes); masks as named.
CASES = {
    "plain": dict(lq=37, lk=53, causal=False, mask=None),
    "padding": dict(lq=37, lk=53, causal=False, mask=_padding(2, 53, [53, 20])),
    "causal_lq_lt_lk": dict(lq=37, lk=53, causal=True, mask=None),
    "causal_and_padding": dict(lq=37, lk=53, causal=True, mask=_padding(2, 53, [53, 41])),
    "causal_lq_gt_lk_empty_rows": dict(lq=53, lk=37, causal=True, mask=None),
    "fully_masked_rows": dict(lq=37, lk=53, causal=False, mask=torch.rand(
        2, 1, 37, 53, generator=torch.Generator().manual_seed(2)) > 0.5),
}
CASES["fully_masked_rows"]["mask"][:, :, 5:9] = False  # query rows 5..8 may attend to nothing


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backend_matches_fp64_oracle_and_torch(backend, case):
    _need(backend)
    c = CASES[case]
    b, h, d, e = 2, 3, 24, 40
    q, k, v = _inputs(b, h, c["lq"], c["lk"], d, e)
    grad_out = torch.randn(b, h, c["lq"], e, generator=torch.Generator().manual_seed(3))
    ours, our_grads = _value_and_grads(
        lambda q, k, v: scaled_dot_product_attention(
            q, k, v, c["mask"], causal=c["causal"], backend=backend),
        q, k, v, grad_out)
    allowed = _full_mask(c["mask"], c["causal"], b, h, c["lq"], c["lk"])
    want, want_grads = _value_and_grads(lambda q, k, v: _oracle(q, k, v, allowed),
                                        q.double(), k.double(), v.double(), grad_out.double())
    assert ours.dtype == torch.float32 and ours.shape == (b, h, c["lq"], e)
    torch.testing.assert_close(ours.double(), want, atol=2e-5, rtol=1e-5)
    for name, got, exp in zip("qkv", our_grads, want_grads):
        assert torch.isfinite(got).all(), f"d{name} has NaN/inf"
        torch.testing.assert_close(got.double(), exp, atol=5e-5, rtol=1e-5, msg=f"d{name}")

    empty = ~allowed.any(-1)  # (b, h, lq): rows that may attend to nothing
    assert (ours[empty] == 0).all()
    # PyTorch's own kernel on the rows it defines.
    theirs, their_grads = _value_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed | empty[..., None]),
        q, k, v, grad_out * (~empty[..., None]))
    torch.testing.assert_close(ours[~empty], theirs[~empty], atol=2e-5, rtol=1e-5)
    for name, got, exp in zip("qkv", our_grads, their_grads):
        torch.testing.assert_close(got, exp, atol=5e-5, rtol=1e-5, msg=f"d{name} vs torch")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backend_fp64_is_exact(backend):
    _need(backend)
    q, k, v = _inputs(2, 2, 19, 29, 8, 12, dtype=torch.float64)
    mask = _padding(2, 29, [29, 11])
    out = scaled_dot_product_attention(q, k, v, mask, causal=True, backend=backend)
    want = _oracle(q, k, v, _full_mask(mask, True, 2, 2, 19, 29))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_additive_bias_values_and_gradient(backend):
    """A float score bias (T5's relative positions) is added before the softmax; d(bias) too."""
    _need(backend)
    q, k, v = _inputs(2, 3, 11, 13, 8, 8)
    bias = torch.randn(1, 3, 11, 13, generator=torch.Generator().manual_seed(4))
    grad_out = torch.randn(2, 3, 11, 8, generator=torch.Generator().manual_seed(5))
    mask = _padding(2, 13, [13, 6])
    ours, our_grads = _value_and_grads(
        lambda q, k, v, bb: scaled_dot_product_attention(
            q, k, v, mask, causal=True, backend=backend, bias=bb),
        q, k, v, grad_out, extra=(bias,))
    allowed = _full_mask(mask, True, 2, 3, 11, 13)
    want, want_grads = _value_and_grads(lambda q, k, v, bb: _oracle(q, k, v, allowed, bias=bb),
                                        q.double(), k.double(), v.double(), grad_out.double(),
                                        extra=(bias.double(),))
    torch.testing.assert_close(ours.double(), want, atol=2e-5, rtol=1e-5)
    for name, got, exp in zip(["q", "k", "v", "bias"], our_grads, want_grads):
        assert got.shape == exp.shape
        torch.testing.assert_close(got.double(), exp, atol=5e-5, rtol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_grouped_query_heads_equal_repeated_heads(backend):
    """GQA (Ainslie et al. 2023): 6 query heads over 2 k/v heads == k/v repeated to 6 heads."""
    _need(backend)
    q, k, v = _inputs(2, 6, 9, 14, 8, 8, hk=2)
    grouped = scaled_dot_product_attention(q, k, v, causal=True, backend=backend)
    repeated = scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                            causal=True, backend=backend)
    torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_scale_argument(backend):
    _need(backend)
    q, k, v = _inputs(1, 2, 5, 7, 4, 4)
    out = scaled_dot_product_attention(q, k, v, scale=0.7, backend=backend)
    everything = torch.ones(1, 2, 5, 7, dtype=torch.bool)
    want = _oracle(q.double(), k.double(), v.double(), everything, scale=0.7)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_auto_picks_a_concrete_backend_and_agrees():
    q, k, v = _inputs(2, 2, 6, 6, 4, 4)
    auto = scaled_dot_product_attention(q, k, v, causal=True)
    reference = scaled_dot_product_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(auto, reference, atol=1e-6, rtol=1e-6)


sdpa = scaled_dot_product_attention


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: sdpa(q, k, v, backend="fast"), "unknown attention backend 'fast'"),
    (lambda q, k, v: sdpa(q, k[:, :, :, :3], v), "head size"),
    (lambda q, k, v: sdpa(q, k, v[:, :, :4]), "must agree"),
    (lambda q, k, v: sdpa(q[0], k, v), "4-d"),
    (lambda q, k, v: sdpa(q, k[:1], v[:1]), "batch sizes differ"),
    (lambda q, k, v: sdpa(q, k[:, :3], v[:, :3]), "multiple of key/value heads"),
    (lambda q, k, v: sdpa(q, k, v, torch.ones(5, 7)), "bool"),
    (lambda q, k, v: sdpa(q, k, v, torch.ones(4, 7, dtype=torch.bool)), "does not broadcast"),
    (lambda q, k, v: sdpa(q, k, v, dropout_p=1.0), "dropout_p"),
])
def test_bad_arguments_raise_value_error(call, message):
    q, k, v = _inputs(2, 4, 5, 7, 8, 8)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


def test_chunked_refuses_dropout():
    _need("chunked")
    q, k, v = _inputs(1, 1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="chunked backend does not support dropout"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.1, backend="chunked")


def test_broadcast_check_agrees_with_torch():
    import itertools

    from polytask.attention.functional import _broadcasts
    target = (2, 3, 4, 5)
    for n in range(6):
        for shape in itertools.product((1, 2, 3, 4, 5, 6), repeat=n):
            try:
                torch.broadcast_shapes(shape, target)
                expect = torch.broadcast_shapes(shape, target) == torch.Size(target)
            except RuntimeError:
                expect = False
            assert _broadcasts(shape, target) == expect, shape
