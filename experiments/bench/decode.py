"""Greedy-decoding benchmark: polytask's KV-cache ``generate`` against Hugging Face ``generate``.

    polytask bench decode                          # target size, batch 16, source 128, out 32/256
    python -m polytask.experiments.bench.decode --size toy --lengths 4 8 --repeats 1

Both models have the same size (see :mod:`polytask.experiments.bench.peers`), run in ``eval()`` under
``torch.no_grad``, greedy, with a KV cache (HF: ``use_cache=True, num_beams=1,
do_sample=False``), on the same random sources without padding. Neither may stop early: HF gets
``min_new_tokens = max_new_tokens``, polytask an end id no token has (``eos_id=-1``), so both
produce exactly ``batch × length`` tokens.

tokens/s = ``batch · length`` / wall time of the whole call (encoder included), median of
``--repeats`` round-robin runs: each round calls every model once, one right after the other,
so both meet the machine in the same state; the ratio of each round's pair is printed too (its
spread is the machine's noise). The per-token cost is ``(call time - encoder time) / length``,
the decoder's cost per step with the one-off encoding taken out, so that "cost at length 256 /
cost at length 32" measures how a step's cost grows with the cached prefix (1.0 = flat).
The row ``polytask (no cache)`` is the slow twin (``use_cache=False``) at the shortest length.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, replace
from typing import Callable

import torch

from polytask.core.accelerate import accelerated
from polytask.core.decoding.generation import generate
from polytask.experiments.bench import emit, output_options, parse
from polytask.experiments.bench.attention import round_robin
from polytask.experiments.bench.flops import CLOCKS
from polytask.experiments.bench.peers import SIZES, Size, build_all


TIMER = {"clock": time.perf_counter}


def _round_robin(fns: dict[str, Callable[[], torch.Tensor]], repeats: int
                 ) -> dict[str, tuple[list[float], torch.Tensor]]:
    """Each function's ``repeats`` timed runs (on ``TIMER``'s clock) and its last output, run
    :func:`polytask.experiments.bench.attention.round_robin`."""
    times, outs = round_robin(list(fns.values()), repeats, TIMER["clock"])
    return {name: (t, out) for name, t, out in zip(fns, times, outs)}


@torch.no_grad()
def run(size: Size, lengths: list[int], *, repeats: int = 3, include_hf: bool = True) -> dict:
    """Measure both models at every output length; returns rows and the derived ratios."""
    names = ["polytask"] + (["hf_t5"] if include_hf else [])
    contenders, missing = build_all(size, names)
    models = {c.name: c.model.eval() for c in contenders}
    src = torch.randint(4, size.vocab, (size.batch, size.length),
                        generator=torch.Generator().manual_seed(2))
    ours = models["polytask"]

    def encode() -> torch.Tensor:
        with accelerated(ours, inference=True):   # as in generate
            return ours.encode(src)

    encoders = {"polytask": encode}
    calls: dict[str, Callable[[int], Callable[[], torch.Tensor]]] = {
        "polytask": lambda n: lambda: generate(ours, src, max_new_tokens=n, eos_id=-1),
    }
    if "hf_t5" in models:
        hf = models["hf_t5"]
        encoders["hf_t5"] = lambda: hf.get_encoder()(input_ids=src)
        calls["hf_t5"] = lambda n: lambda: hf.generate(
            input_ids=src, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
            use_cache=True)
    encode_s = {name: statistics.median(times)
                for name, (times, _) in _round_robin(encoders, repeats).items()}
    rows, round_ratios = [], {}
    for n in lengths:
        timed = _round_robin({name: make(n) for name, make in calls.items()}, repeats)
        for name, (times, out) in timed.items():
            new = out.shape[1] - (1 if name == "hf_t5" else 0)  # HF returns the start token too
            t = statistics.median(times)
            rows.append({"model": name, "length": n, "tokens": size.batch * new, "time_s": t,
                         "tokens_per_s": size.batch * new / t,
                         "per_token_ms": (t - encode_s[name]) / new * 1e3})
        if "hf_t5" in timed:   # the same round's calls, one right after the other
            round_ratios[n] = [h / p for p, h in zip(timed["polytask"][0], timed["hf_t5"][0])]
    n0 = min(lengths)
    no_cache = lambda: generate(ours, src, max_new_tokens=n0, eos_id=-1, use_cache=False)
    times, out = _round_robin({"no cache": no_cache}, max(1, repeats - 1))["no cache"]
    t = statistics.median(times)
    rows.append({"model": "polytask (no cache)", "length": n0, "tokens": out.numel(), "time_s": t,
                 "tokens_per_s": out.numel() / t,
                 "per_token_ms": (t - encode_s["polytask"]) / n0 * 1e3})
    result = {"size": asdict(size), "threads": torch.get_num_threads(), "rows": rows,
              "clock": "cpu" if TIMER["clock"] is CLOCKS["cpu"] else "wall",
              "missing": missing, "speedup_vs_hf": {}, "speedup_per_round": round_ratios,
              "per_token_growth": None}
    by = {(r["model"], r["length"]): r for r in rows}
    for n in lengths:
        if ("hf_t5", n) in by:
            result["speedup_vs_hf"][n] = (by[("polytask", n)]["tokens_per_s"]
                                          / by[("hf_t5", n)]["tokens_per_s"])
    if len(lengths) > 1:
        result["per_token_growth"] = (by[("polytask", max(lengths))]["per_token_ms"]
                                      / by[("polytask", n0)]["per_token_ms"])
    return result


def format_table(result: dict) -> str:
    lines = [f"greedy decoding, fp32, {result['threads']} threads, {result['clock']} clock, "
             f"size {result['size']}",
             f"{'model':<22}{'out len':>8}{'time s':>9}{'tokens/s':>10}{'ms/token step':>15}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<22}{r['length']:>8}{r['time_s']:>9.3f}"
                     f"{r['tokens_per_s']:>10.0f}{r['per_token_ms']:>15.2f}")
    for name, why in result["missing"].items():
        lines.append(f"{name:<22} missing: {why}")
    for n, ratio in result["speedup_vs_hf"].items():
        rounds = result["speedup_per_round"].get(n, [])
        spread = (f" (single rounds {min(rounds):.2f}-{max(rounds):.2f}x)" if len(rounds) > 1
                  else "")
        lines.append(f"polytask / hf_t5 tokens/s at length {n}: {ratio:.2f}x (target >= 2x)"
                     + spread)
    if result["per_token_growth"] is not None:
        lines.append(f"polytask per-token step cost, longest / shortest length: "
                     f"{result['per_token_growth']:.2f}x (target <= 1.5x)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polytask bench decode", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="target")
    for name in ("d_model", "layers", "batch", "length", "vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 256], help="output lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (steadier on a loaded machine)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peer")
    output_options(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parse(parser(), argv)
    TIMER["clock"] = CLOCKS[args.clock]
    overrides = {k: getattr(args, k) for k in ("d_model", "layers", "batch", "length", "vocab")
                 if getattr(args, k) is not None}
    result = run(replace(SIZES[args.size], **overrides), args.lengths, repeats=args.repeats,
                 include_hf=not args.no_hf)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
