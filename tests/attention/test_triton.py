"""The Triton flash-attention backend agrees with the reference backend (values and gradients).

Oracle: ``polytask.attention.reference.reference_attention`` in fp64 on the same inputs, with k/v heads
expanded for grouped-query attention. Without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set below before the kernels are imported), so shapes are tiny and odd,
with 16-wide tiles so every case crosses several query and key tiles and ragged edges.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    # Must happen before polytask.attention.triton_kernels decorates its kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install polytask[triton])")

from polytask.attention.functional import expand_kv_heads, scaled_dot_product_attention  # noqa: E402
from polytask.attention.masks import key_padding_mask, lengths_to_mask  # noqa: E402
from polytask.attention.reference import reference_attention  # noqa: E402
from polytask.attention.triton_flash import _interpreting, triton_attention, unsupported_reason  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _interpreting():
    pytest.skip("no GPU and Triton's interpreter is off in this process (TRITON_INTERPRET is "
                "not 1, or the kernels were imported before it was set); run "
                "TRITON_INTERPRET=1 python -m pytest tests/attention/test_triton.py",
                allow_module_level=True)


def _inputs(b, h, hk, lq, lk, d, dtype=torch.float32, device=DEVICE):
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return make(b, h, lq, d), make(b, hk, lk, d), make(b, hk, lk, d)


def _oracle(q, k, v, mask, causal, grad_out):
    """fp64 reference output and (dq, dk, dv) for the same inputs; k/v expanded for GQA."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    h = q.shape[1]
    out = reference_attention(q64, expand_kv_heads(k64, h), expand_kv_heads(v64, h), mask,
                              causal=causal, scale=q.shape[-1] ** -0.5)
    out.backward(grad_out.double())
    return out, (q64.grad, k64.grad, v64.grad)


def _assert_agrees(q, k, v, mask, causal, atol, rtol=0.0, **kw):
    out = triton_attention(q, k, v, mask, causal=causal, **kw)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref, ref_grads = _oracle(q, k, v, mask, causal, grad_out)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), ref_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=f"d{name}")
    return out


def _key_mask(b, lk, device=DEVICE):
    """Example 0 may attend to nothing, example 1 to a ragged prefix and one hole."""
    keep = torch.ones(b, lk, dtype=torch.bool, device=device)
    keep[0] = False
    keep[1, lk - 13:] = False
    keep[1, 3] = False
    return key_padding_mask(keep)


CASES = {  # b, h, hk, lq, lk, d, causal, masked
    "plain": (1, 2, 2, 37, 53, 16, False, False),
    "causal-gqa-d24": (2, 2, 1, 37, 53, 24, True, False),
    "keymask": (2, 2, 2, 37, 53, 16, False, True),
    "causal-keymask-gqa": (2, 4, 2, 37, 53, 16, True, True),
    "causal-lq>lk-d64": (1, 2, 1, 53, 37, 64, True, False),
    "decode-one-query": (2, 2, 1, 1, 29, 32, True, True),
    "d128": (1, 1, 1, 19, 23, 128, False, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_matches_reference(case):
    b, h, hk, lq, lk, d, causal, masked = case
    q, k, v = _inputs(b, h, hk, lq, lk, d)
    mask = _key_mask(b, lk) if masked else None
    _assert_agrees(q, k, v, mask, causal, atol=2e-5, block_m=16, block_n=16)


@settings(max_examples=8, deadline=None)
@given(lq=st.integers(1, 40), lk=st.integers(1, 40), d=st.sampled_from([16, 24, 40]),
       group=st.sampled_from([1, 2]), causal=st.booleans(), masked=st.booleans())
def test_random_small_shapes_match_reference(lq, lk, d, group, causal, masked):
    torch.manual_seed(lq * 41 + lk)
    q, k, v = _inputs(2, 2, 2 // group, lq, lk, d)
    mask = key_padding_mask(torch.rand(2, lk, device=DEVICE) < 0.7) if masked else None
    _assert_agrees(q, k, v, mask, causal, atol=2e-5, block_m=16, block_n=16)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 5e-3), (torch.bfloat16, 5e-2)])
def test_half_precision_matches_reference(dtype, atol):
    q, k, v = _inputs(2, 2, 1, 21, 35, 16, dtype=dtype)
    _assert_agrees(q, k, v, _key_mask(2, 35), True, atol=atol, rtol=2e-2, block_m=16, block_n=16)


def test_default_tiles_and_noncontiguous_layout():
    # q/k/v as a projection produces them, (b, i, h, d) viewed as (b, h, i, d): strided, not copied.
    x = torch.randn(2, 45, 3 * 2, 24, device=DEVICE, requires_grad=True)
    q, k, v = x.transpose(1, 2).split(2, dim=1)
    assert not q.is_contiguous()
    lengths = torch.tensor([45, 17], device=DEVICE)
    mask = key_padding_mask(lengths_to_mask(lengths, 45))
    out = triton_attention(q, k, v, mask, causal=False)  # default 64x64 tiles
    ref = reference_attention(q, k, v, mask, scale=24 ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=0)


def test_fully_masked_rows_are_zero_with_zero_finite_gradients():
    q, k, v = _inputs(2, 2, 2, 17, 20, 16)
    mask = _key_mask(2, 20)  # example 0 sees nothing
    out = triton_attention(q, k, v, mask, block_m=16, block_n=16)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
    assert out[1].abs().sum() > 0  # the other example is untouched by the empty one


def test_public_function_with_grouped_heads_matches_reference_backend():
    # functional.py hands the kernel unexpanded k/v; the reference backend gets them expanded.
    q, k, v = _inputs(1, 4, 2, 9, 26, 16)
    mask = _key_mask(2, 26)[1:]
    got = scaled_dot_product_attention(q, k, v, mask, causal=True, backend="triton")
    want = scaled_dot_product_attention(q, k, v, mask, causal=True, backend="reference")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("change,message", [
    (dict(dropout_p=0.1), "dropout"),
    (dict(bias=torch.zeros(1, 1, 5, 7)), "bias"),
    (dict(mask=torch.ones(5, 7, dtype=torch.bool)), "not a key mask"),
    (dict(mask=torch.ones(1, 1, 1, 7, dtype=torch.int64)), "must be bool"),
    (dict(d=8), "head size 8"),
    (dict(d=160), "head size 160"),
    (dict(dv=32), "value head size"),
    (dict(dtype=torch.float64), "dtypes"),
    (dict(hk=3), "multiple"),
])
def test_unsupported_arguments_raise_value_error(change, message):
    d, dtype, hk = change.pop("d", 16), change.pop("dtype", torch.float32), change.pop("hk", 2)
    dv = change.pop("dv", d)
    q = torch.randn(1, 4, 5, d, dtype=dtype, device=DEVICE)
    k = torch.randn(1, hk, 7, d, dtype=dtype, device=DEVICE)
    v = torch.randn(1, hk, 7, dv, dtype=dtype, device=DEVICE)
    change = {key: (t.to(DEVICE) if torch.is_tensor(t) else t) for key, t in change.items()}
    mask = change.pop("mask", None)
    assert message in unsupported_reason(q, k, v, mask, **change)
    with pytest.raises(ValueError, match=message):
        triton_attention(q, k, v, mask, **change)


def test_supported_arguments_have_no_reason_and_bad_tiles_raise():
    q, k, v = _inputs(2, 2, 1, 5, 7, 16)
    assert unsupported_reason(q, k, v, _key_mask(2, 7), causal=True) is None
    with pytest.raises(ValueError, match="block_m"):
        triton_attention(q, k, v, block_m=24)


def test_missing_triton_is_reported(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    q, k, v = _inputs(1, 1, 1, 3, 3, 16)
    assert "not installed" in unsupported_reason(q, k, v)
    with pytest.raises(ValueError, match="not installed"):
        triton_attention(q, k, v)


def test_importing_the_backend_does_not_import_triton():
    code = ("import sys, polytask.attention, polytask.attention.triton_flash; "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_bench_flop_count_and_cpu_exit(capsys):
    from polytask.experiments.bench.triton_gpu import attention_flops, main
    # two (L x L x D) matmuls of 2 FLOPs per multiply-add, per (batch, head)
    two_matmuls = 2 * (2 * 5 * 5 * 8)
    assert attention_flops(2, 3, 5, 5, 8, causal=False, backward=False) == 2 * 3 * two_matmuls
    assert attention_flops(2, 3, 5, 5, 8, causal=True, backward=True) == 2 * 3 * 5 * 5 * 8 * 2 * 3.5
    if not torch.cuda.is_available():
        assert main(["--lengths", "64"]) == 0
        assert "needs a CUDA GPU" in capsys.readouterr().out
