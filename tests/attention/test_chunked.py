"""The chunked (online-softmax) backend: its own backward, block handling and memory.

Its values and gradients against the fp64 oracle and PyTorch are in ``test_backends.py``; here:
``torch.autograd.gradcheck`` of the hand-written backward, independence of the block size, the
causal block skipping, and saved-for-backward memory that grows linearly in length where the
reference's grows quadratically (counted with autograd's saved-tensor hooks, so deterministic).
Peak memory and time are measured by ``python -m polytask.experiments.bench.attention``, not asserted.
"""
import pytest
import torch

from polytask.attention.chunked import _blocks, chunked_attention
from polytask.attention.reference import reference_attention


def _qkv(b, h, lq, lk, d, e, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)
            for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, e))]


@pytest.mark.parametrize("lq, lk, causal, with_mask, with_bias, fast", [
    (4, 5, True, True, True, False),   # every Jacobian entry, on the smallest shapes
    (5, 7, False, False, False, True),  # the rest by random projections (fast_mode)
    (5, 7, True, False, False, True),   # causal with Lq < Lk: bottom-right diagonal
    (7, 5, True, False, False, True),   # Lq > Lk: the first rows see nothing
    (6, 9, True, True, True, True),     # causal + padding + a differentiable bias
    (6, 9, False, True, True, True),
])
def test_gradcheck_fp64(lq, lk, causal, with_mask, with_bias, fast):
    b, h = (1, 1) if not fast else (2, 2)
    q, k, v = _qkv(b, h, lq, lk, 2 if not fast else 3, 3 if not fast else 4)
    mask = None
    if with_mask:
        mask = torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[0, :, 1] = False  # one fully masked row
    inputs = [q, k, v]
    if with_bias:  # broadcast over the batch, so its gradient is a reduction
        inputs.append(torch.randn(1, h, lq, lk, dtype=torch.float64, requires_grad=True))

    def f(q, k, v, bias=None):
        return chunked_attention(q, k, v, mask, causal=causal, scale=0.5, bias=bias, block_size=2)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("block", [1, 3, 8, 64])
def test_block_size_does_not_change_the_result(block):
    q, k, v = _qkv(1, 2, 13, 21, 4, 5)
    mask = torch.arange(21)[None, None, None, :] < 17
    want = reference_attention(q, k, v, mask, causal=True, scale=0.5)
    got = chunked_attention(q, k, v, mask, causal=True, scale=0.5, block_size=block)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_causal_blocks_skip_hidden_rows_and_columns():
    # Lq = Lk = 8, blocks of 2 keys: key block j0 is seen only by queries i >= j0.
    assert list(_blocks(8, 8, True, 2)) == [(0, 0, 2), (2, 2, 4), (4, 4, 6), (6, 6, 8)]
    # Decoding: 2 queries are the last of 6 positions; both see keys 0..4, the last sees 5.
    assert list(_blocks(2, 6, True, 4)) == [(0, 0, 4), (0, 4, 6)]
    # Lq > Lk: query i sees keys j <= i - 3; the second key block is seen from row 4 + 3 = 7 on.
    assert list(_blocks(10, 7, True, 4)) == [(3, 0, 4), (7, 4, 7)]
    # Without the causal mask every block is seen by every row.
    assert list(_blocks(3, 5, False, 2)) == [(0, 0, 2), (0, 2, 4), (0, 4, 5)]


def test_fully_masked_rows_are_zero_with_zero_gradient():
    q, k, v = _qkv(1, 1, 4, 6, 3, 3)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out = chunked_attention(q, k, v, mask, scale=1.0, block_size=4)
    out.sum().backward()
    assert (out[..., 2, :] == 0).all()
    assert (q.grad[..., 2, :] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_fp32(dtype):
    q, k, v = _qkv(1, 2, 9, 11, 8, 8, dtype=torch.float32, grad=False)
    want = reference_attention(q, k, v, causal=True, scale=0.35)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    got = chunked_attention(*low, causal=True, scale=0.35, block_size=4)
    got.float().sum().backward()
    assert got.dtype == dtype and all(t.grad.dtype == dtype for t in low)
    tol = 2e-3 if dtype == torch.float16 else 2e-2  # input rounding: 10 vs 7 mantissa bits
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_bad_block_size():
    q, k, v = _qkv(1, 1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        chunked_attention(q, k, v, scale=1.0, block_size=0)


def _saved_bytes(fn, length):
    """Bytes of the distinct storages autograd keeps for the backward of one call."""
    q, k, v = _qkv(1, 2, length, length, 16, 16, dtype=torch.float32)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v, None, causal=True, scale=0.25)
    return sum(storages.values())


def test_saved_memory_grows_linearly_where_reference_grows_quadratically():
    """The chunked backward recomputes the weights instead of storing them (FlashAttention-2)."""
    chunked = lambda *a, **kw: chunked_attention(*a, **kw, block_size=32)  # noqa: E731
    c256, c512 = _saved_bytes(chunked, 256), _saved_bytes(chunked, 512)
    r256, r512 = _saved_bytes(reference_attention, 256), _saved_bytes(reference_attention, 512)
    assert c512 / c256 < 2.1, (c256, c512)   # linear: doubling L doubles the memory
    assert r512 / r256 > 3.5, (r256, r512)   # quadratic: the (i, j) weights dominate
    assert c512 < r512 / 8
