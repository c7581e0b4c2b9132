"""Benchmark: the Triton flash-attention kernels on a GPU, in TFLOP/s.

Run: ``python -m polytask.experiments.bench triton`` or ``python -m polytask.experiments.bench.triton_gpu
[--lengths 1024,2048,4096] [--batch 4] [--heads 16] [--kv-heads 16] [--head-dim 64]
[--dtype fp16] [--causal] [--peak-tflops 312]``. Without CUDA it says so and exits 0.

Method, so the number can be taken the same way on any GPU:

1. FLOPs. Attention is two matmuls, ``S = q kᵀ`` and ``O = P v``, each ``2·L²·D`` FLOPs
   (``L²·D`` multiply-adds) per (batch, head), so a forward pass is ``4·B·H·L²·D`` FLOPs
   (Lq = Lk = L). With ``--causal`` half of the scores are skipped: ``2·B·H·L²·D``. The
   backward does five matmuls of that size (recompute S, dV = Pᵀ dO, dP = dO vᵀ, dQ = dS k,
   dK = dSᵀ q), counted as 2.5× the forward (the FlashAttention-2 paper's convention), so
   forward+backward = 3.5× the forward. Softmax, masking and the rescaling are not counted.
2. Time. Each measurement is preceded by ``--warmup`` calls (compilation, caches), then
   ``--reps`` calls are timed one by one with CUDA events, and the median is reported.
   The forward is timed with autograd recording (inputs require grad), as in training;
   forward+backward is ``out = f(q, k, v)`` then ``torch.autograd.grad(out, (q, k, v), dO)``.
3. Peak. ``--peak-tflops`` is the datasheet dense peak for the dtype (e.g. A100 fp16/bf16
   tensor cores: 312). Without it the peak is *measured* as the TFLOP/s of a large
   ``8192 × 8192 × 8192`` matmul in the same dtype (``2·N³`` FLOPs) — an achievable peak, so
   fractions of it read higher than fractions of the datasheet number. The report names which.
4. Baseline. ``F.scaled_dot_product_attention`` (PyTorch picks its fastest kernel, usually its
   own FlashAttention-2) on the same tensors in the same process; "vs sdpa" is
   ``sdpa time / triton time`` (> 1 means the Triton kernel is faster). Both outputs are
   compared first; the max abs difference is printed so a fast wrong kernel cannot hide.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, *, causal: bool,
                    backward: bool) -> float:
    """FLOPs of one call as counted in the module docstring (forward, or forward+backward)."""
    fwd = 4.0 * b * h * lq * lk * d * (0.5 if causal else 1.0)
    return fwd * 3.5 if backward else fwd


def _median_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measured_peak_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    """TFLOP/s of an ``n × n × n`` matmul: the achievable dense peak on this GPU and dtype."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = _median_ms(lambda: a @ b, warmup=3, reps=10)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="polytask bench triton",
                                description="TFLOP/s of the Triton flash-attention kernels")
    p.add_argument("--lengths", default="1024,2048,4096", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="datasheet peak for the dtype; default: measure a large matmul")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Print one table row per (length, pass); returns the exit status (0)."""
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("triton benchmark: needs a CUDA GPU (none found); nothing measured.")
        return 0
    from polytask.attention.triton_flash import triton_attention, unsupported_reason

    dtype, b, h, hk, d = DTYPES[args.dtype], args.batch, args.heads, args.kv_heads, args.head_dim
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops, "given by --peak-tflops"
    else:
        peak, peak_src = measured_peak_tflops(dtype), "measured 8192^3 matmul"
    print(f"GPU {torch.cuda.get_device_name()}  dtype {args.dtype}  b={b} h={h} hk={hk} d={d}  "
          f"causal={args.causal}  peak {peak:.1f} TFLOP/s ({peak_src})")
    print(f"{'L':>6} {'pass':>8} {'triton ms':>10} {'TFLOP/s':>8} {'% peak':>7} "
          f"{'sdpa ms':>8} {'vs sdpa':>8} {'max|diff|':>10}")
    for length in args.lengths:
        q = torch.randn(b, h, length, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(b, hk, length, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(b, hk, length, d, device="cuda", dtype=dtype, requires_grad=True)
        reason = unsupported_reason(q, k, v, causal=args.causal)
        if reason:
            print(f"{length:>6} skipped: {reason}")
            continue
        ours = lambda: triton_attention(q, k, v, causal=args.causal)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=args.causal, enable_gqa=hk != h)  # Lq == Lk: same diagonal
        with torch.no_grad():
            diff = (ours().float() - theirs().float()).abs().max().item()
        grad_out = torch.randn(b, h, length, d, device="cuda", dtype=dtype)
        for backward in (False, True):
            if backward:
                step = lambda f: lambda: torch.autograd.grad(f(), (q, k, v), grad_out)  # noqa: E731
            else:
                step = lambda f: lambda: f()  # noqa: E731
            ms = _median_ms(step(ours), args.warmup, args.reps)
            ms_ref = _median_ms(step(theirs), args.warmup, args.reps)
            tflops = attention_flops(b, h, length, length, d, causal=args.causal,
                                     backward=backward) / (ms * 1e-3) / 1e12
            name = "fwd+bwd" if backward else "fwd"
            print(f"{length:>6} {name:>8} {ms:>10.3f} {tflops:>8.1f} {100 * tflops / peak:>6.1f}% "
                  f"{ms_ref:>8.3f} {ms_ref / ms:>7.2f}x {diff:>10.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
