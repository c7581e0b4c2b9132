"""The native CPU decoding kernels (attention/native.cpp) against their PyTorch twins.

* The small-rows linear equals ``F.linear`` (+ activation) over odd shapes: rows not a multiple
  of the 8-row tile, outputs not a multiple of the 32-column panel, 1-d and 3-d inputs, with
  and without bias; more rows than ``MAX_ROWS`` go to the fallback.
* The single-query attention equals ``F.scaled_dot_product_attention`` and the hand-written
  reference over odd head sizes, one key, large scores, and strided keys/values (a view of the
  growing self-attention cache, the fused projection's output).
* Both with PyTorch's pool at two threads (another split of the work).
* What they refuse (autograd, fp64, two queries) goes to PyTorch; a failed build warns and
  falls back; ``POLYTASK_NATIVE=0`` switches them off.

The kernels never run with autograd, so there are no gradients to compare. The tests skip when
the kernels cannot be built (no compiler), unless ``POLYTASK_REQUIRE_NATIVE=1`` (CI sets it).
"""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from polytask.attention import native
from polytask.attention.kv_cache import KVCache
from polytask.attention.packed import ACTIVATIONS
from polytask.attention.reference import reference_attention


@pytest.fixture(scope="module")
def kernels():
    module = native.kernels()
    if module is None:
        if os.environ.get("POLYTASK_REQUIRE_NATIVE") == "1":
            pytest.fail("POLYTASK_REQUIRE_NATIVE=1 but the native kernels did not build")
        pytest.skip("native kernels not built (no C++ compiler or ninja?)")
    return module


def _no_fallback():
    raise AssertionError("the fallback was used")


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("in_f,out_f", [(1, 1), (5, 31), (64, 32), (257, 33), (48, 100)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_rows_linear_matches_f_linear(kernels, rows, in_f, out_f, bias):
    w = torch.randn(out_f, in_f) / in_f ** 0.5
    b = torch.randn(out_f) if bias else None
    x = torch.randn(rows, in_f)
    with torch.no_grad():
        lin = native.small_rows_linear(w, b, None, _no_fallback)
        assert isinstance(lin, native.SmallRowsLinear)
        torch.testing.assert_close(lin(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_small_rows_linear_activation_and_3d_input(kernels, activation):
    w, b = torch.randn(70, 40) / 40 ** 0.5, torch.randn(70)
    x = torch.randn(5, 1, 40)   # (batch, one new token, features), as a decoding step
    with torch.no_grad():
        got = native.small_rows_linear(w, b, activation, _no_fallback)(x)
    expected = ACTIVATIONS[activation][1](F.linear(x, w, b))
    assert got.shape == (5, 1, 70)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_small_rows_linear_sends_many_rows_and_other_dtypes_to_the_fallback(kernels):
    w = torch.randn(16, 8)
    calls = []

    def fallback():
        calls.append(1)
        return lambda x: F.linear(x, w.to(x.dtype))

    with torch.no_grad():
        lin = native.small_rows_linear(w, None, None, fallback)
        x = torch.randn(native.MAX_ROWS + 1, 8)
        torch.testing.assert_close(lin(x), F.linear(x, w))
        assert calls == [1]
        x64 = torch.randn(2, 8, dtype=torch.float64)
        torch.testing.assert_close(lin(x64), F.linear(x64, w.double()))
        assert calls == [1]   # made once, reused
        lin(torch.randn(native.MAX_ROWS, 8))
        assert calls == [1]


def test_small_rows_linear_refuses_autograd_fp64_and_bad_activation(kernels):
    made = []
    fallback = lambda: made.append(1) or (lambda x: x)   # noqa: E731
    w = torch.randn(4, 4, requires_grad=True)
    native.small_rows_linear(w, None, None, fallback)                       # autograd on
    native.small_rows_linear(torch.randn(4, 4, dtype=torch.float64), None, None, fallback)
    native.small_rows_linear(torch.randn(4, 4), torch.randn(3), None, fallback)   # bad bias
    assert made == [1, 1, 1]
    with pytest.raises(ValueError, match="unknown activation 'swish'.*relu"):
        native.small_rows_linear(torch.randn(4, 4), None, "swish", fallback)


def _attention_twins(q, k, v, scale):
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    reference = reference_attention(q.double(), k.double(), v.double(), scale=scale)
    return expected, reference.float()


@pytest.mark.parametrize("b,h,lk,d,e", [(1, 1, 1, 8, 8), (3, 4, 7, 16, 24), (2, 2, 130, 64, 64),
                                        (1, 3, 33, 65, 17)])
def test_single_query_attention_matches_sdpa_and_reference(kernels, b, h, lk, d, e):
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, e)
    assert native.can_attend(q, k, v)
    got = native.single_query_attention(q, k, v, d ** -0.5)
    expected, reference = _attention_twins(q, k, v, d ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_single_query_attention_large_scores_stay_finite(kernels):
    q, k = torch.randn(2, 2, 1, 16) * 100, torch.randn(2, 2, 9, 16) * 100
    v = torch.randn(2, 2, 9, 16)
    got = native.single_query_attention(q, k, v, 0.25)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _attention_twins(q, k, v, 0.25)[1], rtol=1e-4, atol=1e-4)


def test_single_query_attention_over_strided_cache_and_projection_views(kernels):
    b, h, d = 3, 4, 8
    cache = KVCache()
    for _ in range(5):   # a growing buffer: k, v are narrowed views with a gap between heads
        k, v = cache.update(torch.randn(b, h, 1, d), torch.randn(b, h, 1, d))
    assert not k.is_contiguous()
    fused = torch.randn(b, 1, 3 * h * d)   # q as split from a fused q/k/v projection
    q = fused[..., : h * d].view(b, 1, h, d).transpose(1, 2)
    assert not q.is_contiguous() and native.can_attend(q, k, v)
    got = native.single_query_attention(q, k, v, 0.3)
    torch.testing.assert_close(got, _attention_twins(q, k, v, 0.3)[0], rtol=1e-5, atol=1e-5)


def test_kernels_agree_on_two_threads(kernels):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, b, x = torch.randn(300, 96), torch.randn(300), torch.randn(21, 96)
        with torch.no_grad():
            got = native.small_rows_linear(w, b, None, _no_fallback)(x)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        q, k, v = torch.randn(5, 3, 1, 32), torch.randn(5, 3, 50, 32), torch.randn(5, 3, 50, 32)
        torch.testing.assert_close(native.single_query_attention(q, k, v, 0.2),
                                   _attention_twins(q, k, v, 0.2)[0], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_can_attend_refuses_what_the_kernel_does_not_do(kernels):
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    assert native.can_attend(q, k, v)
    assert not native.can_attend(torch.randn(2, 2, 2, 8), k, v)             # two queries
    assert not native.can_attend(q.double(), k.double(), v.double())        # fp64
    assert not native.can_attend(q, k[:, :1], v[:, :1])                     # grouped heads
    assert not native.can_attend(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v)
    assert not native.can_attend(q.requires_grad_(), k, v)                  # autograd
    with torch.no_grad():
        assert native.can_attend(q, k, v)


def test_kernel_errors_name_the_bad_shapes(kernels):
    with pytest.raises(RuntimeError, match=r"q must be \(B, H, 1, D\)"):
        kernels.single_query_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4),
                                       torch.randn(1, 1, 3, 4), 1.0)
    with pytest.raises(RuntimeError, match="must be a CPU float32 tensor"):
        kernels.pack_weight(torch.randn(3, 3, dtype=torch.float64))
    panels = kernels.pack_weight(torch.randn(40, 8))
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.linear_small_rows(torch.randn(2, 9), panels, None, 40)


def test_block_errors_name_the_bad_cache(kernels):
    x, w = torch.randn(2, 8), torch.ones(8)
    panels = kernels.pack_weight(torch.randn(24, 8))
    out = kernels.pack_weight(torch.randn(8, 8))
    buf = torch.zeros(2, 2, 4, 4)
    with pytest.raises(RuntimeError, match="do not fit position 4"):
        kernels.self_attention_block(x, w, None, 1e-5, False, panels, None, out, None, buf, buf,
                                     4, 0.5)
    with pytest.raises(RuntimeError, match="unknown activation 'swish'"):
        kernels.ffn_block(x, w, None, 1e-5, True, panels, None, 24, "swish",
                          kernels.pack_weight(torch.randn(8, 24)), None)


def test_pip_ninja_put_on_path_when_missing(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/nonexistent")
    native._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    native._ninja_on_path()   # found now: PATH unchanged
    assert os.environ["PATH"] == ninja.BIN_DIR + os.pathsep + "/nonexistent"


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("POLYTASK_NATIVE", "0")
    assert native.kernels() is None
    made = []
    native.small_rows_linear(torch.randn(4, 4), None, None, lambda: made.append(1))
    assert made == [1]


def test_failed_build_warns_and_falls_back(monkeypatch):
    def broken():
        raise OSError("no compiler here")
    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*no compiler here"):
        assert native.kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # tried once: no second warning
        assert native.kernels() is None
