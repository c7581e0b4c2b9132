"""``.ci/gpu-check``'s training step: the built-in suite trained on the GPU in bf16 and on the
CPU in fp32, and whether the two loss curves agree.

Both runs are ``polytask train experiments/configs/tiny.yaml`` with the same overrides and the
same ``train.max_steps`` (so the same learning-rate schedule, data order and initial weights:
the model is built on the CPU from the seed, then moved), a small evaluation only at the end;
one adds ``train.device=cuda train.bf16=true``. They run at the same time. The CPU run is
stopped (its process group killed) once it has logged ``cpu_steps`` steps, or when the time
runs out (its curve is then what it logged): it only has to cover the start of the curve.

The loss of a step is the ``loss`` of its ``metrics.jsonl`` record (the sum of the task losses).
Checks, over windows of ``window`` steps (1-20, 21-40, 41-60 on a GPU):

* ``finite``: every logged loss of both runs is finite, and the GPU run took all its steps;
* ``cpu_reached``: the CPU run covered at least two windows;
* ``decreasing``: in each run the last full window the CPU covered has a lower mean than the
  first;
* ``first_step``: the first losses differ by at most ``FIRST_STEP_TOL`` (relative): same
  weights, same batch, only the arithmetic differs;
* ``band``: every window mean of the GPU run is within ``WINDOW_TOL`` (relative) of the CPU's.
  bf16 autocast against fp32 on the CPU moves these means by about 0.1% over 60 steps on this
  config; 5% still fails a run whose attention is wrong (it stalls near the unigram loss, 5-10%
  above).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FIRST_STEP_TOL = 0.02
WINDOW_TOL = 0.05
SMALL_EVAL = ["train.eval_every=100000", "train.save_every=100000", "data.eval_examples=16",
              "data.test_examples=16", "train.generation_max_tokens=8"]


def train_losses(run_dir: Path) -> list[float]:
    """The ``loss`` of every complete ``train`` record of ``run_dir/metrics.jsonl``, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    losses = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # a line being written
            continue
        if record.get("event") == "train":
            losses.append(float(record["loss"]))
    return losses


def command(root: Path, out: Path, steps: int, device: str, bf16: bool) -> list[str]:
    return [sys.executable, "-m", "polytask.experiments.cli", "train",
            str(root / "experiments" / "configs" / "tiny.yaml"), f"train.max_steps={steps}",
            f"train.device={device}", f"train.bf16={str(bf16).lower()}", *SMALL_EVAL,
            "--out", str(out), "--no-progress"]


def _stop(proc: subprocess.Popen) -> None:
    """Kill the process group this module started for ``proc``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # started with start_new_session: its own group
        except ProcessLookupError:
            pass
        proc.wait()


def run_pair(root: Path, work: Path, env: dict[str, str], *, device: str, bf16: bool,
             steps: int, cpu_steps: int, timeout: float) -> dict:
    """Start the accelerator run (``steps`` steps) and the CPU fp32 run (same config, stopped
    after ``cpu_steps``), both with environment ``env``; wait for both or ``timeout`` seconds.
    Returns both curves (the CPU's first ``cpu_steps``), exit codes and output tails."""
    cpu_env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    runs = {"gpu": (work / "train_gpu", device, bf16, env), "cpu": (work / "train_cpu", "cpu",
                                                                      False, cpu_env)}
    procs, logs = {}, {}
    for name, (out, dev, half, e) in runs.items():
        logs[name] = open(work / f"train_{name}.log", "w")
        procs[name] = subprocess.Popen(command(root, out, steps, dev, half), cwd=root, env=e,
                                       stdout=logs[name], stderr=subprocess.STDOUT,
                                       start_new_session=True)
    start, stopped_cpu, timed_out = time.monotonic(), False, False
    try:
        while True:
            if procs["cpu"].poll() is None and len(train_losses(runs["cpu"][0])) >= cpu_steps:
                _stop(procs["cpu"])
                stopped_cpu = True
            if all(p.poll() is not None for p in procs.values()):
                break
            if time.monotonic() - start > timeout:   # the CPU run is time-bounded: it keeps
                timed_out = procs["gpu"].poll() is None   # what it logged; the GPU's must end
                stopped_cpu = stopped_cpu or procs["cpu"].poll() is None
                break
            time.sleep(0.25)
    finally:
        for p in procs.values():
            _stop(p)
        for f in logs.values():
            f.close()
    seconds = time.monotonic() - start
    result = {"seconds": seconds, "timed_out": timed_out}
    for name, (out, dev, half, _) in runs.items():
        tail = (work / f"train_{name}.log").read_text()[-2000:]
        losses = train_losses(out)
        # the CPU run may log a step or two more before it is stopped: the curve is cpu_steps
        result[name] = {"device": dev, "bf16": half, "returncode": procs[name].returncode,
                        "stopped": stopped_cpu if name == "cpu" else False,
                        "logged_steps": len(losses),
                        "loss": losses[:cpu_steps] if name == "cpu" else losses,
                        "output_tail": tail}
    return result


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def compare(gpu: list[float], cpu: list[float], *, steps: int, window: int) -> dict:
    """The checks of the module doc on two loss curves; ``{"checks": {name: bool},
    "windows": [...], "failures": [one line each]}``."""
    n_windows = min(len(cpu), len(gpu)) // window
    windows = []
    for w in range(n_windows):
        g, c = _mean(gpu[w * window:(w + 1) * window]), _mean(cpu[w * window:(w + 1) * window])
        windows.append({"steps": [w * window + 1, (w + 1) * window], "gpu": g, "cpu": c,
                        "relative_difference": abs(g - c) / abs(c)})
    finite = all(math.isfinite(x) for x in gpu + cpu)
    checks, failures = {}, []

    def check(name: str, ok: bool, why: str) -> None:
        checks[name] = bool(ok)
        if not ok:
            failures.append(f"{name}: {why}")

    check("finite", finite and len(gpu) == steps,
          f"GPU run logged {len(gpu)} of {steps} steps; finite losses: {finite}")
    check("cpu_reached", n_windows >= 2,
          f"the CPU run logged {len(cpu)} steps, fewer than two windows of {window}")
    if n_windows >= 2 and finite:
        first, last = windows[0], windows[-1]
        check("decreasing", last["gpu"] < first["gpu"] and last["cpu"] < first["cpu"],
              f"mean loss of steps {first['steps']} -> {last['steps']}: GPU {first['gpu']:.4f} "
              f"-> {last['gpu']:.4f}, CPU {first['cpu']:.4f} -> {last['cpu']:.4f}")
        check("first_step", abs(gpu[0] - cpu[0]) <= FIRST_STEP_TOL * abs(cpu[0]),
              f"step 1 loss GPU {gpu[0]:.4f} vs CPU {cpu[0]:.4f} (tolerance {FIRST_STEP_TOL:.0%})")
        outside = [w for w in windows if w["relative_difference"] > WINDOW_TOL]
        check("band", not outside, "; ".join(
            f"steps {w['steps']}: GPU {w['gpu']:.4f} vs CPU {w['cpu']:.4f} "
            f"({w['relative_difference']:.1%} > {WINDOW_TOL:.0%})" for w in outside))
    tail = gpu[-window:] if len(gpu) >= window else gpu
    return {"checks": checks, "failures": failures, "windows": windows,
            "gpu_last_window_mean": _mean(tail) if tail else None}
