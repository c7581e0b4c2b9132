"""``polytask bench``: benchmarks that measure polytask against peers in the same run.

    polytask bench attention [--lengths ...]  attention backends: time and peak memory vs sdpa
    polytask bench train [--size ...]    training step vs HF T5, nn.Transformer, x-transformers
    polytask bench decode                cached greedy decoding vs HF generate
    polytask bench triton                Triton flash attention on a GPU
    polytask bench memory [--tasks ...]  peak memory of a training step under each task weighting
    polytask bench weighting [--tasks 2 4 8 16] [--methods ...]  step time and peak memory of
                                         every task weighting relative to static, at k tasks
    polytask bench all                   attention, train, decode and memory

``polytask bench NAME --help`` lists NAME's options. Timings are never asserted in tests;
figures are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
from typing import Any, Iterator

SUBCOMMANDS = {
    "attention": "polytask.experiments.bench.attention",
    "train": "polytask.experiments.bench.train",
    "decode": "polytask.experiments.bench.decode",
    "triton": "polytask.experiments.bench.triton_gpu",
    "memory": "polytask.experiments.bench.memory",
    "weighting": "polytask.experiments.bench.weighting",
}
NOT_IN_ALL = ("triton", "weighting")   # a GPU's; tens of minutes on a CPU


def output_options(p: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--json``, which the CPU benchmarks share (read by :func:`parse` and
    :func:`emit`)."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results to this path")


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed; ``--threads`` sets torch's thread count before anything is timed."""
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    return args


def error_text(err: BaseException, limit: int | None = None) -> str:
    """``Type: message`` on one line (at most ``limit`` characters), for a failed measurement
    recorded in a table or JSON instead of stopping the benchmark."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:limit]


def emit(result: dict[str, Any], table: str, json_path: str | None) -> dict[str, Any]:
    """Print a benchmark's table and, with ``--json PATH``, write its result there."""
    print(table)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Drop the PyTorch profiler's ``USDT:... profiler_start`` / ``profiler_stop`` lines.

    Kineto writes them from C++ straight to file descriptor 2 whatever ``KINETO_LOG_LEVEL``
    says, so ``sys.stderr`` cannot catch them: the descriptor is pointed at a temporary file
    while the block runs, and every other line (a warning, a traceback) is written back to
    stderr afterwards, in order. Every benchmark's profiled block
    (:func:`polytask.experiments.bench.attention.peak_bytes`) runs inside it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True)
                    if not line.startswith(b"USDT:")]
            if kept:
                sys.stderr.flush()
                os.write(2, b"".join(kept))


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    name, rest = argv[0], argv[1:]
    names = list(SUBCOMMANDS) if name == "all" else [name]
    if name != "all" and name not in SUBCOMMANDS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(SUBCOMMANDS)}, all")
    if name == "all" and rest:
        raise ValueError(f"polytask bench all takes no options (got {' '.join(rest)}); run the "
                         "benchmarks one by one to pass options")
    for n in names:
        if name == "all" and n in NOT_IN_ALL:
            continue
        result = importlib.import_module(SUBCOMMANDS[n]).main(rest)
        if isinstance(result, int) and result:  # some benchmarks return their figures
            return result
    return 0
