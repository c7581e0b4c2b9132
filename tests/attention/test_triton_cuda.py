"""The Triton flash-attention kernels compiled for a real GPU (not Triton's CPU interpreter),
against PyTorch's SDPA, in fp32 and bf16, values and gradients. Skipped without CUDA;
``.ci/gpu-check`` runs them with ``TRITON_INTERPRET`` unset.

Oracle: the reference backend in fp64 on the same inputs. Each kernel's error is the largest
absolute difference from the oracle divided by the oracle's largest magnitude (of the output,
or of each gradient). PyTorch's SDPA (the ``sdpa`` backend, on the same fp32 / bf16 inputs)
is the yardstick: Triton's error must stay within a floor plus a small multiple of SDPA's,
the floor being what the dtype allows (the CPU-interpreter tests, tests/attention/
test_triton.py, use atol 2e-5 in fp32 and 5e-2 in bf16 on tiny shapes). A wrong tile, mask or
scale gives errors of order 1. The shapes are realistic and ragged, with the default tiles.
"""
import pytest
import torch

from polytask.attention.functional import (expand_kv_heads, resolve_backend,
                                           scaled_dot_product_attention)
from polytask.attention.masks import key_padding_mask
from polytask.attention.reference import reference_attention

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA")]
if CUDA:
    pytest.importorskip("triton", reason="triton is not installed (pip install polytask[triton])")

# normalised error floor, and how many times SDPA's own error Triton may add on top
TOLERANCE = {torch.float32: (5e-5, 4.0), torch.bfloat16: (2e-2, 2.0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

CASES = {  # b, h, hk, lq, lk, d, causal, key mask
    "self-d64": (2, 8, 8, 1024, 1024, 64, False, False),
    "causal-gqa-odd": (2, 8, 2, 1000, 1000, 64, True, False),
    "cross-keymask-d128": (2, 4, 4, 300, 777, 128, False, True),
    "causal-lq<lk-keymask-d32": (3, 4, 1, 200, 517, 32, True, True),
    "decode-one-query": (4, 8, 2, 1, 333, 64, True, True),
    "short-d16": (1, 2, 2, 17, 9, 16, False, False),
}


def _ragged_mask(b: int, lk: int) -> torch.Tensor:
    """Example n keeps a prefix of ``lk - 37 n`` keys (at least half), and key 0 is a hole:
    every query row of the cases still sees at least one key."""
    keep = torch.ones(b, lk, dtype=torch.bool, device="cuda")
    for n in range(1, b):
        keep[n, max(lk // 2, lk - 37 * n):] = False
    keep[:, 0] = False
    return key_padding_mask(keep)


def _run(q, k, v, mask, causal, grad_out, backend):
    out = scaled_dot_product_attention(q, k, v, mask, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


def _oracle(q, k, v, mask, causal, grad_out):
    """fp64 reference output and (dq, dk, dv); k/v expanded for grouped heads."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    h = q.shape[1]
    out = reference_attention(q64, expand_kv_heads(k64, h), expand_kv_heads(v64, h), mask,
                              causal=causal, scale=q.shape[-1] ** -0.5)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), grad_out.double()))


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _inputs(case, dtype, seed=0):
    b, h, hk, lq, lk, d, causal, masked = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    def make(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype).requires_grad_()
    q, k, v = make(b, h, lq, d), make(b, hk, lk, d), make(b, hk, lk, d)
    grad_out = torch.randn(b, h, lq, d, device="cuda", generator=g).to(dtype)
    return q, k, v, (_ragged_mask(b, lk) if masked else None), causal, grad_out


def test_kernels_are_compiled_not_interpreted():
    from polytask.attention.triton_flash import _interpreting, triton_attention
    q = torch.randn(1, 1, 16, 16, device="cuda")
    triton_attention(q, q, q)
    import polytask.attention.triton_kernels as kernels
    assert not _interpreting(), "TRITON_INTERPRET is set: unset it to test the compiled kernels"
    assert type(kernels.flash_fwd_kernel).__name__ != "InterpretedFunction"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_values_and_gradients_match_sdpa(case, dtype):
    q, k, v, mask, causal, grad_out = _inputs(case, dtype)
    assert resolve_backend("auto", q, k=k, v=v, mask=mask, causal=causal) == "triton"
    ours = _run(q, k, v, mask, causal, grad_out, "triton")
    sdpa = _run(q, k, v, mask, causal, grad_out, "sdpa")
    oracle = _oracle(q, k, v, mask, causal, grad_out)
    floor, times = TOLERANCE[dtype]
    for name, got, theirs, want in zip(("out", "dq", "dk", "dv"), ours, sdpa, oracle):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert bool(torch.isfinite(got).all()), name
        err, err_sdpa = _error(got, want), _error(theirs, want)
        bound = floor + times * err_sdpa
        assert err <= bound, f"{name}: triton error {err:.2e} > {bound:.2e} (sdpa {err_sdpa:.2e})"
        diff = _error(got, theirs.double())
        assert diff <= bound + err_sdpa, f"{name}: triton vs sdpa {diff:.2e}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fully_masked_rows_are_zero_with_zero_gradients(dtype):
    q, k, v, _, _, grad_out = _inputs((2, 4, 2, 70, 90, 64, True, False), dtype, seed=1)
    keep = torch.ones(2, 90, dtype=torch.bool, device="cuda")
    keep[0] = False                                   # example 0 may attend to nothing
    out, dq, dk, dv = _run(q, k, v, key_padding_mask(keep), True, grad_out, "triton")
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0
    for g in (dq, dk, dv):
        assert bool(torch.isfinite(g).all()) and torch.equal(g[0], torch.zeros_like(g[0]))


def test_model_under_bf16_autocast_matches_sdpa():
    """A padded batch through the encoder-decoder with every attention on Triton, under bf16
    autocast (what ``train.bf16`` does), against the same weights on SDPA; fp32 SDPA is the
    oracle."""
    from polytask.core.model.config import ModelConfig
    from polytask.core.model.transformer import EncoderDecoder

    torch.manual_seed(0)
    base = dict(vocab_size=300, d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                d_ff=256, dropout=0.0)
    models = {b: EncoderDecoder(ModelConfig(**base, attention_backend=b)).cuda()
              for b in ("triton", "sdpa")}
    models["sdpa"].load_state_dict(models["triton"].state_dict())
    src = torch.randint(4, 300, (4, 75), device="cuda")
    tgt = torch.randint(4, 300, (4, 41), device="cuda")
    lengths = lambda *n: torch.tensor(n, device="cuda")[:, None]  # noqa: E731
    src_mask = torch.arange(75, device="cuda") < lengths(75, 60, 33, 7)
    tgt_mask = torch.arange(41, device="cuda") < lengths(41, 20, 41, 3)

    def run(backend: str, bf16: bool):
        model = models[backend]
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(src, tgt, src_mask, tgt_mask)
        logits.float()[tgt_mask].square().mean().backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        return [logits.detach().float()[tgt_mask]] + grads

    oracle = [t.double() for t in run("sdpa", bf16=False)]
    ours, sdpa = run("triton", bf16=True), run("sdpa", bf16=True)
    floor, times = TOLERANCE[torch.bfloat16]
    names = ["logits"] + [n for n, _ in models["triton"].named_parameters()]
    for name, got, theirs, want in zip(names, ours, sdpa, oracle):
        if name.endswith("k_proj.bias"):
            continue   # exactly zero: a key bias shifts a query's scores alike (softmax ignores it)
        err, err_sdpa = _error(got, want), _error(theirs, want)
        assert err <= floor + times * err_sdpa, f"{name}: {err:.2e} vs sdpa {err_sdpa:.2e}"
