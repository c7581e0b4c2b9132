"""Training-step benchmark: polytask against its peers, same size, same process, same run.

    polytask bench train                       # the issue's target point (d 256, 3+3, b 16, L 128)
    polytask bench train --size large --steps 3 --json train.json
    python -m polytask.experiments.bench.train --size toy --steps 1 --rounds 1   # seconds

One step = ``zero_grad`` + forward + token-mean cross-entropy + backward + AdamW step, fp32,
on random ids with no padding. Peers compute the logits and ``F.cross_entropy``; polytask takes
its training loop's path (``GenerativeLoss.from_hidden``: the LM head and the loss in row
chunks, :mod:`polytask.losses.linear_ce`), which never holds the ``(b·t, V)`` logits. polytask uses :func:`polytask.core.training.optim.make_optimizer` (fused AdamW);
peers use ``torch.optim.AdamW(model.parameters())`` as their own examples do
(``--peer-optimizer fused`` gives them the fused kernel too).

**Time.** After ``--warmup`` steps each, ``--rounds`` rounds run ``--steps`` steps of every model
in turn (round-robin, so load from other processes on a shared machine falls on all alike); the
step time is the median over all timed steps. tokens/s = ``b·(s + t)`` / step time.

**Memory.** Peak bytes of one step from the PyTorch profiler's allocator events
(``profile_memory=True``: every CPU tensor allocation and free in time order, cumulated; this is
what PyTorch allocates — activations, saved tensors, gradients, workspaces — not the Python heap)
plus the bytes alive before the step: parameters, buffers and AdamW's two moments.

**FLOPs.** :mod:`polytask.experiments.bench.flops` counts polytask's step analytically; achieved FLOP/s
(median step) is divided by the fp32 2048² ``torch.mm`` peak measured in the same run: the best
of 3 mm's after every round, median over the rounds. The same product through oneDNN with a
packed weight is sampled alongside (on the benchmark machine it is faster than MKL's ``mm``),
and the fraction of that higher peak is reported too.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
from dataclasses import asdict, replace

import torch

from polytask.core.accelerate import accelerated
from polytask.core.training.optim import make_optimizer
from polytask.experiments.bench import emit, output_options, parse
from polytask.experiments.bench.attention import peak_bytes
from polytask.experiments.bench.flops import CLOCKS, matmul_peak, onednn_matmul_peak, step_flops
from polytask.experiments.bench.peers import BUILDERS, SIZES, Contender, Size, build_all, polytask_config


def make_step(c: Contender, size: Size, peer_optimizer: str):
    """A closure running one training step of contender ``c`` on a fixed random batch."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, size.vocab, (size.batch, size.length), generator=g)
    tgt = torch.randint(4, size.vocab, (size.batch, size.length + 1), generator=g)
    tgt_in, labels = tgt[:, :-1], tgt[:, 1:].reshape(-1)
    c.model.train()
    if c.name == "polytask":
        opt = make_optimizer(c.model.named_parameters(), lr=1e-4, weight_decay=0.01,
                             betas=(0.9, 0.999), device=torch.device("cpu"))
    else:
        opt = torch.optim.AdamW(c.model.parameters(), lr=1e-4,
                                fused=True if peer_optimizer == "fused" else None)

    # polytask trains with its CPU fast paths switched on, as its training loop does
    fast = (lambda: accelerated(c.model)) if c.name == "polytask" else contextlib.nullcontext

    def step() -> float:
        with fast():
            opt.zero_grad(set_to_none=True)
            loss = c.loss(src, tgt_in, labels)
            loss.backward()
            opt.step()
        return loss.item()

    return step, opt


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of parameters, buffers and optimizer state."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def run(size: Size, models: list[str], *, warmup: int = 2, rounds: int = 3, steps: int = 2,
        peer_optimizer: str = "default", memory: bool = True, clock: str = "wall") -> dict:
    """Measure every model; returns ``{"size", "rows", "missing", "flops", "peak_flops", ...}``."""
    timer = CLOCKS[clock]
    torch.manual_seed(0)
    contenders, missing = build_all(size, models)
    steps_fns = [make_step(c, size, peer_optimizer) for c in contenders]
    for fn, _ in steps_fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in contenders]
    peaks: list[float] = []
    dnn_peaks: list[float] = []
    for _ in range(rounds):
        for n, (fn, _) in enumerate(steps_fns):
            for _ in range(steps):
                start = timer()
                fn()
                times[n].append(timer() - start)
        # the mm peak is sampled in every round too, so that it sees the machine in the same
        # state as the steps it is compared with (a VM's speed drifts over minutes)
        peaks.append(matmul_peak(repeats=3, timer=timer))
        dnn = onednn_matmul_peak(repeats=3, timer=timer)
        if dnn is not None:
            dnn_peaks.append(dnn)
    peak = statistics.median(peaks)
    dnn_peak = statistics.median(dnn_peaks) if dnn_peaks else None
    tokens = size.batch * 2 * size.length
    rows = []
    for c, (fn, opt), ts in zip(contenders, steps_fns, times):
        t = statistics.median(ts)
        row = {"model": c.name, "params": sum(p.numel() for p in c.model.parameters()),
               "step_s": t, "step_s_all": ts, "tokens_per_s": tokens / t,
               "optimizer": "fused" if c.name == "polytask" or peer_optimizer == "fused"
               else "default"}
        if memory:
            row["peak_bytes"] = state_bytes(c.model, opt) + peak_bytes(fn)
        rows.append(row)
    flops = step_flops(polytask_config(size), size.batch, size.length, size.length)
    ours = next(r for r in rows if r["model"] == "polytask")
    peers = [r for r in rows if r["model"] != "polytask"]
    fastest = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
    t5 = next((r for r in peers if r["model"] == "hf_t5"), None)
    return {
        "size": asdict(size), "tokens_per_step": tokens, "threads": torch.get_num_threads(),
        "clock": clock,
        "rows": rows, "missing": missing, "flops": flops, "peak_flops": peak,
        "peak_flops_per_round": peaks,
        "achieved_flops": flops["total"] / ours["step_s"],
        "fraction_of_peak": flops["total"] / ours["step_s"] / peak,
        "onednn_peak_flops": dnn_peak, "onednn_peak_flops_per_round": dnn_peaks,
        "fraction_of_onednn_peak": (flops["total"] / ours["step_s"] / dnn_peak
                                    if dnn_peak else None),
        "fastest_peer": fastest["model"] if fastest else None,
        "speed_ratio": ours["tokens_per_s"] / fastest["tokens_per_s"] if fastest else None,
        "memory_ratio_vs_hf_t5": (ours["peak_bytes"] / t5["peak_bytes"]
                                  if t5 and memory else None),
    }


def format_table(result: dict) -> str:
    ours = next(r for r in result["rows"] if r["model"] == "polytask")
    lines = [f"training step, fp32, {result['threads']} threads, {result['clock']} clock, "
             f"size {result['size']}",
             f"{'model':<16}{'params':>10}{'step ms':>10}{'tokens/s':>11}{'vs polytask':>13}"
             f"{'peak MB':>10}  optimizer"]
    for r in result["rows"]:
        mem = f"{r['peak_bytes'] / 2**20:>10.1f}" if "peak_bytes" in r else f"{'-':>10}"
        lines.append(f"{r['model']:<16}{r['params'] / 1e6:>9.2f}M{r['step_s'] * 1e3:>10.1f}"
                     f"{r['tokens_per_s']:>11.0f}{r['tokens_per_s'] / ours['tokens_per_s']:>13.2f}"
                     f"{mem}  {r['optimizer']}")
    for name, why in result["missing"].items():
        lines.append(f"{name:<16} missing: {why}")
    f = result["flops"]
    lines.append(f"polytask step: {f['total'] / 1e9:.1f} GFLOP ({f['linear'] / 1e9:.1f} linear + "
                 f"{f['attention'] / 1e9:.1f} attention) -> {result['achieved_flops'] / 1e9:.1f} "
                 f"GFLOP/s = {result['fraction_of_peak']:.0%} of the fp32 mm peak "
                 f"{result['peak_flops'] / 1e9:.1f} GFLOP/s")
    if result.get("onednn_peak_flops"):
        lines.append(f"  ({result['fraction_of_onednn_peak']:.0%} of the same product through "
                     f"oneDNN with a packed weight, {result['onednn_peak_flops'] / 1e9:.1f} "
                     f"GFLOP/s on this machine)")
    if result["speed_ratio"] is not None:
        lines.append(f"polytask / fastest peer ({result['fastest_peer']}) tokens/s: "
                     f"{result['speed_ratio']:.2f}x (target >= 1.10x)")
    if result["memory_ratio_vs_hf_t5"] is not None:
        lines.append(f"polytask / hf_t5 peak memory: {result['memory_ratio_vs_hf_t5']:.2f} "
                     f"(target <= 1.00)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polytask bench train", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="target")
    for name in ("d_model", "layers", "batch", "length", "vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--peer-optimizer", choices=["default", "fused"], default="default")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (steadier on a loaded machine "
                        "with --threads 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiler memory pass")
    output_options(p)
    return p


def sized(args: argparse.Namespace) -> Size:
    overrides = {k: getattr(args, k) for k in ("d_model", "layers", "batch", "length", "vocab",
                                               "dropout") if getattr(args, k) is not None}
    return replace(SIZES[args.size], **overrides)


def main(argv: list[str] | None = None) -> dict:
    args = parse(parser(), argv)
    result = run(sized(args), args.models, warmup=args.warmup, rounds=args.rounds,
                 steps=args.steps, peer_optimizer=args.peer_optimizer, memory=not args.no_memory,
                 clock=args.clock)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
