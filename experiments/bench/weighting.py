"""Step time and peak memory of every task weighting, relative to ``static``, at k tasks.

    polytask bench weighting                     # weighting.yaml's size, k = 2 4 8 16, all
    polytask bench weighting --tasks 4 8 --methods static pcgrad famo --json weighting.json
    python -m polytask.experiments.bench.weighting --size toy --tasks 2 --methods static pcgrad \\
        --steps 1 --rounds 1 --warmup 1            # seconds

**Tasks.** k tasks are generated in a temporary directory from the training data of
``weighting.yaml``'s suite (``default``): task i takes the first ``--examples`` training records
of built-in task ``BASES[i mod 6]`` (generation and classification alternate: reverse, wn_pos,
wn_antonym, parity, sort, wn_lexname) under its own instruction, ``"Task i: <instruction>"``, so
that every task is a distinct task with its own head. The tokenizer is the one a run of
weighting.yaml trains (on the suite's texts), the same at every k.
Sampling is ``round_robin``: every batch of 32 holds rows of all k <= 32 tasks, so a step at k
costs what k present tasks cost (a random mixture would leave some tasks out of some batches).

**Size.** ``--size default``: ``experiments/configs/weighting.yaml`` as it is (d_model 128,
4 heads, 2+2 layers, d_ff 512, dropout 0.1, vocabulary 1000, sources up to 96 and targets up
to 32 tokens, batch 32), hard sharing. ``--size toy``: the same run scaled down for tests.

**Step.** The training loop's step, by its own functions: :func:`polytask.experiments.build.
build_run` and :func:`~polytask.experiments.build.build_parts` build each method's run (same
seed: same initial weights, same sampler stream), and one step is what
:func:`polytask.experiments.train.train` does per step, inside
:func:`polytask.core.accelerate.accelerated`: ``_accumulate`` (sample, collate, forward, task
losses, the weighting's backward: whatever the loop does for that weighting, e.g. per-task
gradients in one pass), ``_update`` (clip, AdamW, schedule, zero the gradients) and, for
weightings that observe the step (FAMO), ``_after_step``.

**Time.** After ``--warmup`` steps of every method, ``--rounds`` rounds run ``--steps`` steps of
every method in turn (round-robin, so load from other processes falls on all alike; every method
has taken the same number of steps, so at each round all of them see the same batches). Step
time = the median over the timed steps; ``time ratio`` = method / static at the same k.

**Memory.** Each method's next step, measured alone: on the CPU the peak of (allocated - freed)
bytes from the PyTorch profiler's allocator events
(:func:`polytask.experiments.bench.attention.peak_bytes`), on CUDA
``torch.cuda.max_memory_allocated`` over the step minus what was allocated before it; plus the
``state`` (parameters, buffers of the model and weighting, AdamW's moments). ``memory ratio`` =
peak / static's peak; ``extra MiB`` = peak - static's peak, printed next to ``k x shared MiB``
(k fp32 vectors over the shared parameters: the issue's target is at most static + k x shared
for methods that need the k gradients, static + O(k^2) for the Gramian-only ones).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from polytask import losses
from polytask.core.accelerate import accelerated
from polytask.core.data.task_data import TaskData, read_records
from polytask.core.data.tokenizer import Tokenizer
from polytask.core.data.tasks import TaskSpec
from polytask.experiments.bench import emit, error_text, output_options, parse
from polytask.experiments.bench.attention import peak_bytes
from polytask.experiments.bench.train import state_bytes
from polytask.experiments.build import build_parts, build_run, tokenizer_corpus
from polytask.experiments.config import RunConfig
from polytask.experiments.config_files import load_yaml
from polytask.experiments.suite import load_suite, task_spec
from polytask.experiments.train import _accumulate, _after_step, _observes_steps, _update

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "weighting.yaml"
BASES = ("reverse", "wn_pos", "wn_antonym", "parity", "sort", "wn_lexname")
SIZES: dict[str, dict[str, dict]] = {   # overrides of weighting.yaml, section -> keys
    "default": {},
    "toy": {"model": {"d_model": 32, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1,
                      "d_ff": 64},
            "data": {"vocab_size": 200, "max_source_len": 24, "max_target_len": 8},
            "train": {"batch_size": 8}},
}
MIB = 2**20


def write_tasks(k: int, root: Path, examples: int) -> list[dict]:
    """k task specs (as a run config lists them) over JSONL files written under ``root``."""
    specs = []
    for i in range(k):
        base = task_spec(BASES[i % len(BASES)])
        instruction = f"Task {i}: {base.templates[0]}"
        path = root / f"task{i:02d}.train.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for n, (_, record) in enumerate(read_records(base.files["train"])):
                if n == examples:
                    break
                f.write(json.dumps({"instruction": instruction, "input": record.get("input", ""),
                                    "output": record["output"]}) + "\n")
        specs.append({"name": f"t{i:02d}_{base.name}", "kind": base.kind, "labels": base.labels,
                      "files": {"train": str(path)}})
    return specs


def sections(size: str) -> dict:
    """weighting.yaml's sections with the size's overrides (no grid, no seeds)."""
    if size not in SIZES:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    data = load_yaml(CONFIG)
    data.pop("grid", None)
    data.pop("seeds", None)
    for section, keys in SIZES[size].items():
        data[section] = {**data.get(section, {}), **keys}
    return data


def run_config(size: str, specs: list[dict], method: str, device: str, bf16: bool) -> RunConfig:
    """The run of ``method`` on the generated tasks: weighting.yaml at ``size``, round-robin
    sampling, on ``device`` (``bf16``: autocast)."""
    data = sections(size)
    data["tasks"] = specs
    data["weighting"] = {"method": method}
    data["data"] = {**data["data"], "sampling": "round_robin"}
    # max_steps only shapes the schedule: the measured steps stay at its flat start
    data["train"] = {**data["train"], "device": device, "bf16": bf16, "max_steps": 100_000,
                     "warmup_steps": 0}
    return RunConfig.from_dict(data)


@dataclass
class Contender:
    """One method's run at one k: the loop's step and what the memory figures need."""

    method: str
    model: nn.Module
    step: Callable[[], int]          # one training step; returns its tokens
    state: Callable[[], int]         # bytes of parameters, buffers and optimizer state
    params: int
    shared_params: int


def _numel(params: list[nn.Parameter]) -> int:
    """Elements of the distinct tensors in ``params`` (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def suite_tokenizer(size: str) -> Tokenizer:
    """The tokenizer a run of weighting.yaml trains: on its suite's training texts, at its
    ``data.vocab_size``. Every k uses this one, so the vocabulary (and the LM head) is the same
    at every k, and k = 2 tasks' texts need not support the full vocabulary."""
    config = sections(size)
    data = TaskData.load(load_suite(config["tasks"]), splits=("train",))
    return Tokenizer.train(tokenizer_corpus(data), config["data"]["vocab_size"],
                           model_type=config["data"].get("tokenizer", "unigram"))


def build(method: str, size: str, specs: list[dict], run_dir: Path, device: str,
          bf16: bool) -> Contender:
    """``method``'s run as ``polytask train`` builds it, with the tokenizer saved in
    ``run_dir`` (as a resumed run loads its own)."""
    cfg = run_config(size, specs, method, device, bf16)
    tasks = [TaskSpec.from_dict(s) for s in specs]
    data, tokenizer, model = build_run(cfg, tasks, run_dir, fresh_tokenizer=False)
    parts = build_parts(cfg, tasks, data, model)
    model.train()
    t, loop = cfg.train, {"step": 0, "bad_steps": 0, "consecutive_bad": 0}

    def step() -> int:   # one iteration of experiments.train.train (one process, no logging)
        model.set_progress(loop["step"] / t.max_steps)
        _, _, finite, n_tokens, batch = _accumulate(cfg, parts, model, data, tokenizer, 0, 1)
        finite = _update(parts, loop, finite, 1, loop["step"], t)
        if finite and _observes_steps(parts.weighting):
            _after_step(parts, model, batch, t)
        loop["step"] += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return n_tokens

    def state() -> int:
        return state_bytes(nn.ModuleList([model, parts.weighting]), parts.optimizer)

    return Contender(method, model, step, state, _numel(parts.trainable), _numel(parts.shared))


def step_peak(step: Callable[[], int], device: str) -> int:
    """Bytes one step allocates beyond what was allocated before it (see the module doc)."""
    if torch.device(device).type != "cuda":
        return peak_bytes(step)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - before


def measure_k(k: int, methods: list[str], size: str, tokenizer: Tokenizer, *, examples: int,
              warmup: int, rounds: int, steps: int, device: str, bf16: bool
              ) -> tuple[list[dict], dict[str, str]]:
    """One row per method at k tasks, and ``{method: error}`` for those that failed (one
    broken method is reported, and the others are still measured; ``methods[0]``, the
    reference, must not fail)."""
    alive: list[Contender] = []
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {m: [] for m in methods}
    tokens: dict[str, list[int]] = {m: [] for m in methods}
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"polytask-bench-weighting-k{k}-") as tmp, \
            contextlib.ExitStack() as stack:
        specs = write_tasks(k, Path(tmp), examples)
        tokenizer.save(Path(tmp) / "tokenizer.model")
        for n, method in enumerate(methods):
            try:
                c = build(method, size, specs, Path(tmp), device, bf16)
                stack.enter_context(accelerated(c.model))   # as train() wraps its loop
                for _ in range(warmup):
                    c.step()
                alive.append(c)
            except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
                if n == 0:
                    raise
                errors[method] = error_text(err)
        for _ in range(rounds):
            for c in list(alive):
                try:
                    for _ in range(steps):
                        start = time.perf_counter()
                        tokens[c.method].append(c.step())
                        times[c.method].append(time.perf_counter() - start)
                except Exception as err:  # noqa: BLE001
                    if c.method == methods[0]:
                        raise
                    errors[c.method] = error_text(err)
                    alive.remove(c)
        for c in alive:
            step_bytes = step_peak(c.step, device)
            state, t = c.state(), statistics.median(times[c.method])
            rows.append({"method": c.method, "k": k, "step_s": t, "step_s_all": times[c.method],
                         "tokens_per_s": statistics.median(tokens[c.method]) / t,
                         "params": c.params, "shared_params": c.shared_params,
                         "state_bytes": state, "step_bytes": step_bytes,
                         "peak_bytes": state + step_bytes})
    return rows, errors


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add each row's ratios to ``static`` at the same k (see the module doc)."""
    for r in rows:
        ref = next(s for s in rows if s["method"] == "static" and s["k"] == r["k"])
        k_shared = r["k"] * r["shared_params"] * 4
        r["time_ratio"] = r["step_s"] / ref["step_s"]
        r["memory_ratio"] = r["peak_bytes"] / ref["peak_bytes"]
        r["extra_mib"] = (r["peak_bytes"] - ref["peak_bytes"]) / MIB
        r["k_shared_mib"] = k_shared / MIB
        r["extra_in_k_shared"] = (r["peak_bytes"] - ref["peak_bytes"]) / k_shared
    return rows


def check_methods(methods: list[str] | None) -> list[str]:
    """The methods to measure, ``static`` (the reference) first; by default every registered
    weighting. An unknown name raises ``ValueError`` listing the known ones."""
    methods = list(dict.fromkeys(methods or losses.WEIGHTINGS.names()))
    for m in methods:
        losses.get_weighting(m)   # "unknown weighting 'x'; known: ..."
    return ["static"] + [m for m in methods if m != "static"]


def run(tasks: list[int], methods: list[str] | None = None, *, size: str = "default",
        examples: int = 400, warmup: int = 2, rounds: int = 3, steps: int = 2,
        device: str = "cpu", bf16: bool = False) -> dict:
    """Measure every method at every k; returns ``{"rows", "errors", ...}`` (module doc)."""
    config = sections(size)
    methods = check_methods(methods)
    batch = config["train"]["batch_size"]
    bad = [k for k in tasks if not 1 <= k <= batch]
    if bad:
        raise ValueError(f"--tasks {bad[0]}: k must be between 1 and the batch size ({batch}) "
                         f"so that every batch holds rows of every task")
    if min(rounds, steps, examples) < 1 or warmup < 0:
        raise ValueError(f"--rounds ({rounds}), --steps ({steps}) and --examples ({examples}) "
                         f"must be >= 1 and --warmup ({warmup}) >= 0")
    rows, errors = [], {}
    tokenizer = suite_tokenizer(size)
    for k in tasks:
        got, failed = measure_k(k, methods, size, tokenizer, examples=examples, warmup=warmup,
                                rounds=rounds, steps=steps, device=device, bf16=bf16)
        rows += got
        errors.update({f"{m} k={k}": e for m, e in failed.items()})
    model = {key: config["model"][key] for key in ("d_model", "n_heads", "n_encoder_layers",
                                                   "n_decoder_layers", "d_ff")}
    return {"size": size, "model": model, "batch": batch, "device": device, "bf16": bf16,
            "threads": torch.get_num_threads(), "tasks": list(tasks), "methods": methods,
            "examples": examples, "warmup": warmup, "rounds": rounds, "steps": steps,
            "rows": with_ratios(rows), "errors": errors}


def format_table(result: dict) -> str:
    m, ks = result["model"], result["tasks"]
    cell = {(r["method"], r["k"]): r for r in result["rows"]}
    lines = [f"one training step per weighting, {result['device']} "
             f"{'bf16 autocast' if result['bf16'] else 'fp32'}, {result['threads']} threads; "
             f"{result['size']} size: d_model {m['d_model']}, {m['n_encoder_layers']}+"
             f"{m['n_decoder_layers']} layers, d_ff {m['d_ff']}, batch {result['batch']}, "
             f"hard sharing; median of {result['rounds'] * result['steps']} steps",
             "static: step ms, peak MiB; others: time ratio, memory ratio, extra MiB over static",
             "", "| weighting | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|" + "---:|" * len(ks)]
    for method in result["methods"]:
        cells = []
        for k in ks:
            r = cell.get((method, k))
            if r is None:
                cells.append("error")
            elif method == "static":
                cells.append(f"{r['step_s'] * 1e3:.1f} ms, {r['peak_bytes'] / MIB:.1f} MiB")
            else:
                cells.append(f"{r['time_ratio']:.2f}x, {r['memory_ratio']:.2f}x, "
                             f"{r['extra_mib']:+.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    shared = [next((r["k_shared_mib"] for r in result["rows"] if r["k"] == k), None) for k in ks]
    lines.append("| k x shared MiB | " + " | ".join("-" if s is None else f"{s:.1f}"
                                                   for s in shared) + " |")
    lines += [f"error: {name}: {why}" for name, why in result["errors"].items()]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polytask bench weighting",
                                description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16], help="values of k")
    p.add_argument("--methods", nargs="+", default=None,
                   help="registered weightings (default: every one); static is always measured")
    p.add_argument("--size", default="default", help=f"one of {', '.join(SIZES)}")
    p.add_argument("--examples", type=int, default=400, help="training examples per task")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    p.add_argument("--device", default="cpu", help="train.device (cpu, cuda)")
    p.add_argument("--bf16", action="store_true", help="train.bf16: autocast to bfloat16")
    output_options(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parse(parser(), argv)
    result = run(args.tasks, args.methods, size=args.size, examples=args.examples,
                 warmup=args.warmup, rounds=args.rounds, steps=args.steps, device=args.device,
                 bf16=args.bf16)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
