"""Benchmark of the attention backends: time and peak memory of forward + backward.

    python -m polytask.experiments.bench.attention                  # B=8, H=8, D=64, causal, L=128/512/1024
    python -m polytask.experiments.bench.attention --lengths 256 --block-size 64 128

For every backend and length it prints the best-of-``repeats`` wall time of one forward and
backward pass, the peak memory that pass allocated beyond its inputs, and both as ratios to
``sdpa`` (PyTorch's fused kernel) measured in the same run. Speed ratio = t_sdpa / t_backend
(above 1 is faster than sdpa); memory ratio = peak_backend / peak_sdpa.

Peak memory is read from the PyTorch profiler's allocator events (``profile_memory=True``):
every tensor allocation and free on the CPU, summed in time order. It counts what PyTorch
allocates (activations, saved tensors, gradients, workspaces), not the Python heap. The kernels
are called directly with the same arguments ``scaled_dot_product_attention`` would pass them.
Timings are never asserted in tests; they are measured here, on demand.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from polytask.attention.chunked import DEFAULT_BLOCK, chunked_attention
from polytask.attention.reference import reference_attention
from polytask.attention.sdpa import sdpa_attention
from polytask.experiments.bench import quiet_profiler

T = TypeVar("T")

KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference_attention,
    "chunked": chunked_attention,
    "sdpa": sdpa_attention,
}


def _step(kernel: Callable[..., torch.Tensor], q, k, v, causal: bool, **kw) -> None:
    out = kernel(q, k, v, None, causal=causal, scale=1.0 / math.sqrt(q.shape[-1]), **kw)
    # autograd.grad returns the gradients instead of accumulating them into .grad, so every
    # step allocates (and the profiler sees) the same tensors.
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of (allocated - freed) bytes while ``fn`` runs, from the profiler's memory events."""
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU],
                                   profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def round_robin(fns: list[Callable[[], T]], repeats: int,
                timer: Callable[[], float] = time.perf_counter) -> tuple[list[list[float]], list[T]]:
    """Each function's ``repeats`` timed runs (seconds) and its last result. After one warm-up
    call each (first-call allocations, kernel selection), the functions run in turn, once per
    round, so that load from other processes on a shared machine falls on all of them alike."""
    results = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for n, fn in enumerate(fns):
            start = timer()
            results[n] = fn()
            times[n].append(timer() - start)
    return times, results


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best-of-``repeats`` seconds of each function, run :func:`round_robin`."""
    return [min(ts) for ts in round_robin(fns, repeats)[0]]


def run(lengths: list[int], batch: int = 8, heads: int = 8, dim: int = 64, causal: bool = True,
        repeats: int = 3, block_sizes: list[int] | None = None,
        backends: list[str] | None = None) -> list[dict]:
    """Measure every (backend, length); returns one dict per row of the printed table."""
    torch.manual_seed(0)
    rows = []
    for length in lengths:
        q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
        variants: list[tuple[str, Callable, dict]] = []
        for name in backends or list(KERNELS):
            if name == "chunked":
                for bs in block_sizes or [DEFAULT_BLOCK]:
                    variants.append((f"chunked/{bs}", KERNELS[name], {"block_size": bs}))
            else:
                variants.append((name, KERNELS[name], {}))
        steps = [lambda kernel=kernel, kw=kw: _step(kernel, q, k, v, causal, **kw)
                 for _, kernel, kw in variants]
        for (label, _, _), step, seconds in zip(variants, steps, best_times(steps, repeats)):
            rows.append({"backend": label, "L": length, "ms": seconds * 1e3,
                         "peak_mib": peak_bytes(step) / 2**20})
    for row in rows:
        ref = next((r for r in rows if r["backend"] == "sdpa" and r["L"] == row["L"]), None)
        row["speed_vs_sdpa"] = ref["ms"] / row["ms"] if ref else float("nan")
        row["memory_vs_sdpa"] = row["peak_mib"] / ref["peak_mib"] if ref else float("nan")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| backend | L | fwd+bwd ms | peak MiB | speed vs sdpa | memory vs sdpa |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['L']} | {r['ms']:.1f} | {r['peak_mib']:.1f} | "
                     f"{r['speed_vs_sdpa']:.2f}x | {r['memory_vs_sdpa']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="polytask bench attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, nargs="+", default=None,
                        help=f"chunked backend block sizes to try (default {DEFAULT_BLOCK})")
    parser.add_argument("--backends", nargs="+", choices=list(KERNELS), default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"B={args.batch} H={args.heads} D={args.dim} causal={args.causal} fp32, "
          f"{torch.get_num_threads()} threads; triton: not measured (needs a GPU)")
    rows = run(args.lengths, args.batch, args.heads, args.dim, args.causal, args.repeats,
               args.block_size, args.backends)
    print(format_table(rows))


if __name__ == "__main__":
    main()
