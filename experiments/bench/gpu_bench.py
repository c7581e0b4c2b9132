"""The attention and training-step benchmarks on one device in bf16: what ``.ci/gpu-check``
measures on a GPU.

    python -m polytask.experiments.bench.gpu_bench attention --device cuda --json attention.json
    python -m polytask.experiments.bench.gpu_bench train --device cuda --json train.json
    python -m polytask.experiments.bench.gpu_bench train --device cpu --sizes toy   # seconds

``polytask bench attention`` and ``polytask bench train`` measure on the CPU in fp32 (they have
no device or dtype option); ``polytask bench triton`` times the Triton kernel alone on a GPU.
These are their device twins, with the same parts and FLOP counts:

* **attention**: forward + backward of ``scaled_dot_product_attention(q, k, v, causal=True,
  backend=...)`` for every backend, on bf16 ``(b, h, L, d)`` tensors. FLOPs as
  :func:`polytask.experiments.bench.triton_gpu.attention_flops` counts them (the causal half of
  the square, backward 2.5x the forward) whatever a backend actually computes;
  tokens/s = ``b·L`` / time.
* **train**: one step of each model of :mod:`polytask.experiments.bench.peers` at a size of
  ``peers.SIZES`` (polytask inside :func:`polytask.core.accelerate.accelerated` with its fused
  AdamW, as its training loop runs; peers with ``torch.optim.AdamW``): ``zero_grad``, forward
  and loss under ``torch.autocast(bfloat16)`` (what ``train.bf16`` does), backward, step. FLOPs:
  :func:`polytask.experiments.bench.flops.step_flops` of the polytask model, used for every
  model (the same arithmetic: a model-FLOPs utilisation); tokens/s = ``b·(s + t)`` / time.

**Peak.** TFLOP/s of a bf16 ``n x n x n`` matmul measured in the same process (n = 8192 on
CUDA, as ``bench triton`` does, 256 elsewhere): an achievable peak, not the datasheet's.
**Time.** The median of ``--reps`` calls after ``--warmup``, each timed with CUDA events on a
GPU, else with ``time.perf_counter``. **Memory.** On CUDA ``torch.cuda.max_memory_allocated``
during one call: for attention minus what was allocated before it (inputs excluded), for a
training step the whole high-water mark (one model is alive at a time: weights, AdamW state,
activations). Elsewhere the PyTorch profiler's allocator events
(:func:`polytask.experiments.bench.attention.peak_bytes`), plus the state for a training step.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from typing import Callable

import torch

from polytask.attention.functional import scaled_dot_product_attention
from polytask.core.accelerate import accelerated
from polytask.core.training.optim import make_optimizer
from polytask.experiments.bench import emit, error_text
from polytask.experiments.bench.attention import peak_bytes
from polytask.experiments.bench.flops import step_flops
from polytask.experiments.bench.peers import SIZES, Contender, build_all, polytask_config
from polytask.experiments.bench.train import state_bytes
from polytask.experiments.bench.triton_gpu import attention_flops

BACKENDS = ("sdpa", "triton", "chunked", "reference")
MIB = 2**20


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int,
                   reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def peak_tflops(device: torch.device) -> float:
    """TFLOP/s of a bf16 square matmul on ``device`` (module doc), best of the median."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: a @ b, device, warmup=3, reps=10)
    return 2.0 * n**3 / seconds / 1e12


def call_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes one call of ``fn`` allocates beyond what was allocated before it."""
    if device.type != "cuda":
        return peak_bytes(fn)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def attention(device: torch.device, lengths: list[int], batch: int, heads: int, dim: int,
              warmup: int, reps: int, peak: float) -> list[dict]:
    """One row per (backend, length): time, tokens/s, TFLOP/s, fraction of peak, memory."""
    from polytask.attention.triton_flash import unsupported_reason
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        grad_out = torch.randn_like(q)
        flops = attention_flops(batch, heads, length, length, dim, causal=True, backward=True)
        for backend in BACKENDS:
            row: dict = {"backend": backend, "L": length}
            rows.append(row)
            reason = unsupported_reason(q, k, v, causal=True) if backend == "triton" else None
            if reason:
                row["skipped"] = reason
                continue

            def step(backend=backend) -> None:
                out = scaled_dot_product_attention(q, k, v, causal=True, backend=backend)
                torch.autograd.grad(out, (q, k, v), grad_out)
            try:
                seconds = median_seconds(step, device, warmup, reps)
                row.update(ms=seconds * 1e3, tokens_per_s=batch * length / seconds,
                           tflops=flops / seconds / 1e12, fraction_of_peak=flops / seconds / 1e12
                           / peak, peak_mib=call_bytes(step, device) / MIB)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: reported, not fatal
                row["error"] = error_text(err, 500)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        ref = next((r for r in rows if r["backend"] == "sdpa" and r["L"] == row["L"]), {})
        if "ms" in row and "ms" in ref:
            row["speed_vs_sdpa"] = ref["ms"] / row["ms"]
    return rows


def _train_step(c: Contender, size, device: torch.device, bf16: bool):
    """The closure of one training step of ``c`` on a fixed random batch, and its optimizer."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, size.vocab, (size.batch, size.length), generator=g).to(device)
    tgt = torch.randint(4, size.vocab, (size.batch, size.length + 1), generator=g).to(device)
    tgt_in, labels = tgt[:, :-1], tgt[:, 1:].reshape(-1)
    c.model.to(device).train()
    if c.name == "polytask":
        opt = make_optimizer(c.model.named_parameters(), lr=1e-4, weight_decay=0.01,
                             betas=(0.9, 0.999), device=device)
    else:
        opt = torch.optim.AdamW(c.model.parameters(), lr=1e-4,
                                fused=True if device.type == "cuda" else None)
    fast = (lambda: accelerated(c.model)) if c.name == "polytask" else contextlib.nullcontext

    def step() -> None:
        with fast():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = c.loss(src, tgt_in, labels)
            loss.backward()
            opt.step()
    return step, opt


def train(device: torch.device, sizes: list[str], models: list[str], bf16: bool, warmup: int,
          reps: int, peak: float) -> list[dict]:
    """One row per (size, model), each model built, measured and freed in turn."""
    rows = []
    for size_name in sizes:
        size = SIZES[size_name]
        flops = step_flops(polytask_config(size), size.batch, size.length, size.length)["total"]
        for name in models:
            row: dict = {"size": size_name, "model": name}
            rows.append(row)
            try:
                built, missing = build_all(size, [name])
                if missing:
                    row["skipped"] = missing[name]
                    continue
                step, opt = _train_step(built[0], size, device, bf16)
                seconds = median_seconds(step, device, warmup, reps)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    torch.cuda.synchronize()
                    peak_b = torch.cuda.max_memory_allocated()
                else:
                    peak_b = state_bytes(built[0].model, opt) + peak_bytes(step)
                row.update(params=sum(p.numel() for p in built[0].model.parameters()),
                           ms=seconds * 1e3, tokens_per_s=size.batch * 2 * size.length / seconds,
                           tflops=flops / seconds / 1e12,
                           fraction_of_peak=flops / seconds / 1e12 / peak, peak_mib=peak_b / MIB)
            except Exception as err:  # noqa: BLE001
                row["error"] = error_text(err, 500)
            finally:
                built = step = opt = None  # noqa: F841 - free the model before the next
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        ours = next((r for r in rows if r["size"] == size_name and r["model"] == "polytask"
                     and "ms" in r), None)
        for r in rows:
            if ours and r["size"] == size_name and "ms" in r:
                r["tokens_per_s_vs_polytask"] = r["tokens_per_s"] / ours["tokens_per_s"]
    return rows


def format_table(result: dict) -> str:
    lines = [f"{result['what']} on {result['device_name']}, bf16, peak {result['peak_tflops']:.1f}"
             f" TFLOP/s (measured bf16 matmul)"]
    key = "backend" if result["what"] == "attention" else "model"
    for r in result["rows"]:
        where = f"L={r['L']}" if "L" in r else f"size={r['size']}"
        if "ms" in r:
            lines.append(f"{r[key]:<15}{where:<12}{r['ms']:>10.3f} ms {r['tokens_per_s']:>12.0f} "
                         f"tok/s {r['tflops']:>8.2f} TFLOP/s {r['fraction_of_peak']:>6.1%} of "
                         f"peak {r['peak_mib']:>9.1f} MiB")
        else:
            lines.append(f"{r[key]:<15}{where:<12}{r.get('skipped') or r.get('error')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m polytask.experiments.bench.gpu_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["attention", "train"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train: fp32 instead of bf16 autocast")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sizes", nargs="+", default=["target", "large"], choices=list(SIZES))
    p.add_argument("--models", nargs="+", default=["polytask", "torch", "hf_t5"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results to this path")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() "
                         "is False); use --device cpu")
    peak = peak_tflops(device)
    if args.what == "attention":
        rows = attention(device, args.lengths, args.batch, args.heads, args.dim, args.warmup,
                         args.reps, peak)
    else:
        rows = train(device, args.sizes, args.models, args.bf16, args.warmup, args.reps, peak)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"what": args.what, "device": str(device), "device_name": name,
              "bf16": args.bf16 if args.what == "train" else True, "peak_tflops": peak,
              "peak_source": "measured bf16 matmul", "rows": rows}
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
