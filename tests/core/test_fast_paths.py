"""Each speed-up of the training/decoding step agrees with its slow, obvious twin (values and
gradients): fused q/k/v and k/v projections, dropping all-True masks, the cached sinusoidal
table, and skipping the (no-op) causal mask for a single query.
"""
import pytest
import torch
from torch import nn

from polytask.attention.kv_cache import KVCache
from polytask.attention.fast import FastMultiHeadAttention
from polytask.attention.multihead import MultiHeadAttention
from polytask.core.model.config import ModelConfig
from polytask.core.model.positions import SinusoidalPositions
from polytask.core.model.transformer import EncoderDecoder


def _mha(fused: bool, **kw) -> MultiHeadAttention:
    """The plain attention, or (``fused``) its fast twin with the same weights."""
    torch.manual_seed(0)
    m = MultiHeadAttention(12, 4, backend="sdpa", **kw).double()
    if fused:
        m.__class__ = FastMultiHeadAttention   # what polytask.core.accelerate.accelerated does
    return m


def _grads(m: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [p.grad.clone() for p in m.parameters()] + [x.grad.clone() for x in inputs]


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"n_kv_heads": 2}])
@pytest.mark.parametrize("cross", [False, True])
def test_fused_projections_equal_separate_ones(kw, cross):
    results = []
    for fused in (True, False):
        m = _mha(fused, **kw)
        x = torch.randn(3, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        c = torch.randn(3, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        c.requires_grad_(True)
        mask = torch.ones(3, 1, 1, 7 if cross else 5, dtype=torch.bool)
        mask[0, ..., 3:] = False
        out = m(x, context=c if cross else None, mask=mask, causal=not cross)
        out.pow(2).sum().backward()
        results.append((out.detach(), _grads(m, x, c) if cross else _grads(m, x)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)


def test_fused_projections_with_cache_equal_separate_ones():
    outs = []
    for fused in (True, False):
        m = _mha(fused).eval()
        x = torch.randn(2, 6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        cache, steps = KVCache(), []
        for i in range(6):
            steps.append(m(x[:, i:i + 1], causal=True, cache=cache))
        outs.append(torch.cat(steps, dim=1))
        torch.testing.assert_close(outs[-1], m(x, causal=True), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-12)


def test_fused_path_is_skipped_for_wrapped_or_hooked_projections():
    m = _mha(True)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    calls = []
    m.k_proj.register_forward_hook(lambda mod, inp, out: calls.append(1))
    m(x)
    assert calls == [1]  # the hook ran: the separate path was taken


def test_dropping_all_true_masks_equals_passing_them():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=30, d_model=16, n_heads=4, d_ff=32, n_encoder_layers=2,
                         n_decoder_layers=2, dropout=0.0, attention_backend="sdpa")
    model = EncoderDecoder(config).double()
    src, tgt = torch.randint(4, 30, (2, 7)), torch.randint(4, 30, (2, 5))
    fast = model(src, tgt)  # nothing padded: the stacks drop both masks
    # The twin: the stack loops written out with the (all-True) masks passed to every layer.
    src_mask, tgt_mask = src != 0, tgt != 0
    x, p = model.encoder.embed(model.embed(src)), model.encoder.prepare(src_mask)
    assert p.mask is None                                  # dropped by prepare
    full_src = src_mask[:, None, None, :]
    for layer in model.encoder.layers:
        x = layer(x, full_src, p.position_bias, p.rope)
    memory = model.encoder.norm(x)
    y, q = model.decoder.embed(model.embed(tgt)), model.decoder.prepare(tgt_mask, src_mask)
    assert q.self_mask is None and q.cross_mask is None
    for layer in model.decoder.layers:
        y = layer(y, memory, tgt_mask[:, None, None, :], full_src, q.position_bias, q.rope)
    slow = model.logits(model.decoder.norm(y))
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-12)
    g_fast = torch.autograd.grad(fast.sum(), list(model.parameters()), allow_unused=True)
    g_slow = torch.autograd.grad(slow.sum(), list(model.parameters()), allow_unused=True)
    for u, v in zip(g_fast, g_slow):
        if u is not None:
            torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_sinusoidal_table_equals_computed_rows(dtype):
    pos = SinusoidalPositions(10, max_length=40)
    for t, start in ((40, 0), (1, 17), (5, 35)):
        torch.testing.assert_close(pos(t, start, dtype=dtype), pos.table(t, start, dtype=dtype),
                                   atol=0, rtol=0)
    with pytest.raises(ValueError):
        pos(2, 39)


def _count_concatenations(monkeypatch) -> dict:
    import polytask.attention.fast as fast
    calls = {"n": 0}
    real = fast._concatenated

    def counted(projections):
        calls["n"] += 1
        return real(projections)

    monkeypatch.setattr(fast, "_concatenated", counted)
    return calls


def test_fused_weights_are_reused_in_a_block_and_refreshed_after_an_update(monkeypatch):
    from polytask.attention.packed import packed_weights
    calls = _count_concatenations(monkeypatch)
    m = _mha(True)
    ref = _mha(False)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    with torch.no_grad(), packed_weights():
        torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=0)
        m(x)
        assert calls["n"] == 1                            # second call: no new concatenation
        for mod in (m, ref):                              # an in-place update (optimizer step)
            mod.k_proj.weight.add_(0.5)
        torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=0)
        assert calls["n"] == 2
        m.k_proj.weight = nn.Parameter(m.k_proj.weight.detach() * 2)   # a replaced parameter
        ref.k_proj.weight = nn.Parameter(ref.k_proj.weight.detach() * 2)
        torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=0)
        assert calls["n"] == 3
    with torch.no_grad():                                 # outside a block: every call
        m(x)
        m(x)
    assert calls["n"] == 5
    out = m(x)                                            # with autograd: a fresh one
    assert calls["n"] == 6 and out.requires_grad


def test_fused_weights_do_not_outlive_a_block_across_a_fused_optimizer_step():
    """A fused AdamW step does not bump the version counter; a concatenation kept across it
    (as the earlier per-module cache did, made by an evaluation between backward and step)
    would be stale."""
    from polytask.attention.packed import packed_weights
    m = _mha(True).float()
    ref = _mha(False).float()
    x = torch.randn(2, 3, 12)
    opt = torch.optim.AdamW(list(m.parameters()) + list(ref.parameters()), lr=0.1, fused=True)
    (m(x).pow(2).sum() + ref(x).pow(2).sum()).backward()
    with torch.no_grad(), packed_weights():               # e.g. an evaluation before the step
        m(x)
    opt.step()
    with torch.no_grad(), packed_weights():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
