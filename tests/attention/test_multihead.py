"""MultiHeadAttention and KVCache against outside references and invariants.

* ``from_torch`` copies ``nn.MultiheadAttention`` and gives its output and input gradients,
  with key padding and attention masks (PyTorch's boolean masks mean True = *blocked*).
* Grouped-query heads equal full multi-head attention whose k/v projections repeat each
  group's rows (Ainslie et al. 2023).
* Incremental decoding with the KV cache equals the full causal pass at every step, also with
  rotary positions; cross-attention keys/values are projected once.
"""
import pytest
import torch
from torch import nn

from polytask.attention.functional import BACKENDS
from polytask.attention.kv_cache import KVCache
from polytask.attention.multihead import MultiHeadAttention

BACKEND_NAMES = ["reference", "chunked", "sdpa"]


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} is not registered in polytask.attention.functional.BACKENDS")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_matches_nn_multihead_attention(backend, bias):
    _need(backend)
    b, t, s, d, h = 3, 6, 9, 16, 4
    theirs = nn.MultiheadAttention(d, h, bias=bias, batch_first=True).double()
    ours = MultiHeadAttention.from_torch(theirs, backend=backend)
    assert ours.q_proj.weight.dtype == torch.float64
    x = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    c = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 4, 7])
    pad = torch.arange(s)[None, :] >= lengths[:, None]        # torch: True = ignore this key
    blocked = torch.rand(t, s, generator=torch.Generator().manual_seed(0)) > 0.7
    blocked[:, 0] = False                                      # every row keeps a key
    want, _ = theirs(x, c, c, key_padding_mask=pad, attn_mask=blocked, need_weights=False)
    allowed = ~pad[:, None, None, :] & ~blocked                # polytask: True = may attend
    got = ours(x, context=c, mask=allowed)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(want)
    gx_want, gc_want = torch.autograd.grad(want, (x, c), grad)
    gx_got, gc_got = torch.autograd.grad(got, (x, c), grad)
    torch.testing.assert_close(gx_got, gx_want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gc_got, gc_want, atol=1e-10, rtol=1e-10)


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="kdim"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))


def test_grouped_query_heads_equal_repeated_kv_projections():
    d, h, hk, dh = 24, 6, 2, 4
    gqa = MultiHeadAttention(d, h, n_kv_heads=hk, backend="reference").double()
    full = MultiHeadAttention(d, h, backend="reference").double()
    with torch.no_grad():
        full.q_proj.load_state_dict(gqa.q_proj.state_dict())
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for src, dst in ((gqa.k_proj, full.k_proj), (gqa.v_proj, full.v_proj)):
            # kv head g serves query heads g·(h/hk) ... (g+1)·(h/hk) - 1
            w = src.weight.view(hk, dh, d).repeat_interleave(h // hk, dim=0).reshape(h * dh, d)
            dst.weight.copy_(w)
            dst.bias.copy_(src.bias.view(hk, dh).repeat_interleave(h // hk, dim=0).reshape(-1))
    assert gqa.k_proj.weight.shape == (hk * dh, d)
    x = torch.randn(2, 7, d, dtype=torch.float64)
    torch.testing.assert_close(gqa(x, causal=True), full(x, causal=True), atol=1e-12, rtol=1e-12)


def _rope(x, offset):
    """Rotary positions (Su et al. 2021) by absolute position offset + t, for the cache test."""
    t, dh = x.shape[-2], x.shape[-1]
    pos = torch.arange(offset, offset + t, dtype=x.dtype)[:, None]
    inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=x.dtype) / dh)
    ang = pos * inv                                            # (t, dh/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)
    return out.flatten(-2)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("rope", [None, _rope])
def test_kv_cache_decoding_equals_full_pass(backend, rope):
    """Feeding 1, 2, 1, ... tokens at a time with the cache equals one causal pass over all 20
    (more than the cache's first capacity of 16, so growing is exercised too)."""
    _need(backend)
    attn = MultiHeadAttention(16, 4, n_kv_heads=2, backend=backend).eval()
    x = torch.randn(2, 20, 16)
    full = attn(x, causal=True, rope=rope)
    cache, outs, start = KVCache(), [], 0
    for step, size in enumerate([1, 2, 1, 3, 1, 1, 4, 2, 5]):
        outs.append(attn(x[:, start:start + size], causal=True, cache=cache, rope=rope))
        start += size
        assert cache.length == start
        torch.testing.assert_close(torch.cat(outs, 1), full[:, :start], atol=1e-6, rtol=1e-6)
    assert start == 20


def test_cross_attention_cache_projects_the_context_once():
    attn = MultiHeadAttention(16, 4, backend="reference").eval()
    memory, x = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    calls = []
    attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
    cache = KVCache()
    steps = [attn(x[:, i:i + 1], context=memory, cache=cache) for i in range(5)]
    assert len(calls) == 1 and cache.static
    torch.testing.assert_close(torch.cat(steps, 1), attn(x, context=memory), atol=1e-6, rtol=1e-6)


def test_cross_attention_cache_keeps_contiguous_keys_and_values():
    """The fused k/v projection returns interleaved views; the static cache keeps each as one
    block (read at every step, see KVCache.set_static), with the same values."""
    attn = MultiHeadAttention(16, 4).eval()
    memory, x = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    k, v = attn._kv(memory)
    assert not k.is_contiguous()   # else this test would not exercise the copy
    cache = KVCache()
    steps = [attn(x[:, i:i + 1], context=memory, cache=cache) for i in range(5)]
    assert cache.k.is_contiguous() and cache.v.is_contiguous()
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
    torch.testing.assert_close(torch.cat(steps, 1), attn(x, context=memory), atol=1e-6, rtol=1e-6)


def test_cache_reorder_keeps_the_chosen_rows():
    attn = MultiHeadAttention(8, 2, backend="reference").eval()
    x = torch.randn(3, 4, 8)
    cache = KVCache()
    attn(x[:, :3], causal=True, cache=cache)
    cache.reorder(torch.tensor([2, 2, 0]))  # e.g. beams 0 and 1 both continue beam 2
    step = attn(x[[2, 2, 0], 3:], causal=True, cache=cache)
    torch.testing.assert_close(step, attn(x[[2, 2, 0]], causal=True)[:, 3:], atol=1e-6, rtol=1e-6)


def test_backends_agree_inside_the_module_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 16)
    mask = (torch.arange(11)[None, :] < torch.tensor([11, 6])[:, None])[:, None, None, :]
    results = {}
    for backend in [n for n in BACKEND_NAMES if n in BACKENDS]:
        torch.manual_seed(1)
        attn = MultiHeadAttention(16, 4, n_kv_heads=2, backend=backend)
        out = attn(x, mask=mask, causal=True)
        grads = torch.autograd.grad(out.square().sum(), list(attn.parameters()))
        results[backend] = (out, grads)
    ref_out, ref_grads = results.pop("reference")
    for backend, (out, grads) in results.items():
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=backend)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=backend)


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=10, n_heads=4), r"n_heads \(4\) must divide d_model \(10\)"),
    (dict(d_model=16, n_heads=4, n_kv_heads=3), r"n_kv_heads \(3\) must divide n_heads \(4\)"),
])
def test_bad_construction_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)
