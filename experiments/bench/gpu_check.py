"""``.ci/gpu-check``: everything that needs a GPU, in one run of under 8 minutes, one JSON file.

    .ci/gpu-check [gpu-check.json]             # on a machine with a CUDA GPU
    .ci/gpu-check --dry-run check.json         # the same steps at toy sizes on the CPU (~30 s)
    .ci/gpu-check --only triton_cuda train_curves

First it checks ``torch.cuda.is_available()``: without CUDA (and without ``--dry-run``) it
prints the command that installs a CUDA build of the pinned torch and exits with status 2;
it never installs anything itself. Then it runs the steps below, in this order, each in its own
process with its own time budget, all under one deadline (``--budget``, 450 s); each is
recorded as pass / fail / skip with its duration, its error text (fail) or reason (skip) and
its figures, and one failing step never stops the others:

=======================  ====================================================================
triton_cuda              pytest tests/attention/test_triton_cuda.py: the Triton kernels compiled
                         (``TRITON_INTERPRET`` unset) against PyTorch's SDPA, fp32 and bf16,
                         values and gradients
per_task_gradients_cuda  pytest tests/**/test_per_task_gradients.py -k cuda (skip: no such file)
train_curves             tiny.yaml trained 200 steps on the GPU in bf16 and 60 on the CPU in
                         fp32; the loss curves compared (:mod:`.gpu_curves`)
bench_attention          attention backends on the GPU in bf16 (:mod:`.gpu_bench`)
bench_train              training steps on the GPU in bf16 autocast (:mod:`.gpu_bench`)
bench_triton             ``polytask bench triton --dtype bf16 --causal``, its table kept
triton_tests_gpu         pytest tests/attention/test_triton.py, which runs on the GPU when there
                         is one: odd shapes, masks, grouped heads, compiled (last: the widest
                         compile time; the steps above cover the kernels already)
=======================  ====================================================================

``--dry-run`` runs every step that has a CPU form at toy sizes on the CPU (the benches, the two
training runs: 8 and 6 steps, windows of 2); the steps that need CUDA run their tests anyway
(which skip) or are skipped at once, and report ``skip`` with a reason starting "no CUDA".
The exit status is 1 if any step failed, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from polytask.experiments.bench import gpu_curves

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "polytask-gpu-check/1"
STATUSES = ("pass", "fail", "skip")


@dataclass
class Context:
    """What every step sees: the repository, a scratch directory, whether to use CUDA (not in
    a dry run), why not, and the deadline (``time.monotonic()``)."""

    root: Path
    work: Path
    cuda: bool
    why_not: str            # "no CUDA" or "--dry-run": the start of a CUDA step's skip reason
    deadline: float

    def env(self) -> dict[str, str]:
        """The children's environment: Triton compiles for real (no interpreter); a dry run
        hides the GPU, if any, so that it is the CPU run everywhere."""
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        if not self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


class Skip(Exception):
    """Raised by a step that does not apply here; its message is the reason."""


class Failed(AssertionError):
    """A step's failure that still carries the step's figures into the record."""

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details


def run_command(cmd: list[str], ctx: Context, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in the repository; ``(exit status or None if it timed out, output tail)``.
    On timeout its process group (started here, for it) is killed."""
    proc = subprocess.Popen(cmd, cwd=ctx.root, env=ctx.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, (out or "")[-4000:]


def junit_counts(path: Path) -> dict:
    """Totals of a pytest ``--junit-xml`` report, the failed tests and the skip reasons."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failed, reasons = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        skipped = case.find("skipped")
        if skipped is not None and skipped.get("message") not in reasons:
            reasons.append(skipped.get("message"))
    return {**counts, "failed": failed, "skip_reasons": reasons}


def pytest_step(tag: str, files: list[str], extra: list[str], ctx: Context,
                timeout: float) -> dict:
    """Run pytest; fail on any failure, skip if every selected test skipped (or none was)."""
    xml = ctx.work / f"junit-{tag}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           f"--junit-xml={xml}", *files, *extra]
    rc, tail = run_command(cmd, ctx, timeout)
    if rc is None:
        raise TimeoutError(f"pytest timed out after {timeout:.0f} s: {tail[-300:]}")
    if rc == 5:
        raise Skip(f"no test selected by {' '.join(files + extra)}")
    counts = junit_counts(xml) if xml.is_file() else {}
    details = {"command": " ".join(cmd[1:]), **counts}
    if rc != 0:
        failed = ", ".join(counts.get("failed", [])[:10]) or "see output"
        raise Failed(f"pytest exit status {rc}; failed: {failed}; output: "
                     f"{' '.join(tail.split()[-60:])}", details)
    if counts and counts["tests"] == counts["skipped"]:
        why = "; ".join(r for r in counts["skip_reasons"] if r)
        prefix = "" if ctx.cuda else f"{ctx.why_not}: "
        raise Skip(f"{prefix}all {counts['tests']} tests skipped ({why})")
    return details


def step_triton_cuda(ctx: Context, timeout: float) -> dict:
    return pytest_step("triton_cuda", ["tests/attention/test_triton_cuda.py"], [], ctx, timeout)


def step_triton_tests_gpu(ctx: Context, timeout: float) -> dict:
    if not ctx.cuda:
        raise Skip(f"{ctx.why_not}: tests/attention/test_triton.py runs on the GPU only when "
                   "there is one (on a CPU in Triton's interpreter, in the ordinary suite)")
    return pytest_step("triton_tests", ["tests/attention/test_triton.py"], [], ctx, timeout)


def step_per_task_gradients(ctx: Context, timeout: float) -> dict:
    found = sorted((ctx.root / "tests").glob("**/test_per_task_gradients.py"))
    if not found:
        raise Skip("absent: no tests/**/test_per_task_gradients.py in this checkout")
    return pytest_step("per_task", [str(p.relative_to(ctx.root)) for p in found], ["-k", "cuda"],
                       ctx, timeout)


def _bench(what: str, args: list[str], ctx: Context, timeout: float) -> dict:
    """Run :mod:`.gpu_bench` ``what`` in a child; fail on a row that errored."""
    out = ctx.work / f"{what}.json"
    cmd = [sys.executable, "-m", "polytask.experiments.bench.gpu_bench", what, *args,
           "--json", str(out)]
    rc, tail = run_command(cmd, ctx, timeout)
    if rc is None:
        raise TimeoutError(f"{what} benchmark timed out after {timeout:.0f} s")
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"{what} benchmark exit status {rc}: {' '.join(tail.split()[-60:])}")
    result = json.loads(out.read_text())
    errors = [f"{r.get('backend') or r.get('model')}: {r['error']}" for r in result["rows"]
              if "error" in r]
    if ctx.cuda:
        errors += [f"{r.get('backend') or r.get('model')}: skipped on CUDA: {r['skipped']}"
                   for r in result["rows"] if r.get("skipped") and r.get("backend") == "triton"]
    if errors or not any("ms" in r for r in result["rows"]):
        raise Failed("; ".join(errors) or f"{what}: no row was measured", result)
    return result


def step_bench_attention(ctx: Context, timeout: float) -> dict:
    if ctx.cuda:
        args = ["--device", "cuda", "--lengths", "1024", "4096", "--batch", "8", "--heads", "16",
                "--dim", "64"]
    else:
        args = ["--device", "cpu", "--lengths", "32", "--batch", "1", "--heads", "2", "--dim",
                "16", "--warmup", "1", "--reps", "2"]
    result = _bench("attention", args, ctx, timeout)
    result["note"] = ("polytask bench attention measures on the CPU in fp32 only (no --device "
                      "or --dtype); these are its backends on this device in bf16")
    return result


def step_bench_train(ctx: Context, timeout: float) -> dict:
    if ctx.cuda:
        args = ["--device", "cuda", "--sizes", "target", "large", "--models", "polytask",
                "torch", "hf_t5"]
    else:
        args = ["--device", "cpu", "--sizes", "toy", "--models", "polytask", "--warmup", "1",
                "--reps", "2"]
    result = _bench("train", args, ctx, timeout)
    result["note"] = ("polytask bench train measures on the CPU in fp32 only (no --device or "
                      "--bf16); these are its models on this device under bf16 autocast")
    return result


def step_bench_triton(ctx: Context, timeout: float) -> dict:
    if not ctx.cuda:
        raise Skip(f"{ctx.why_not}: polytask bench triton needs a GPU")
    cmd = [sys.executable, "-m", "polytask.experiments.bench", "triton", "--dtype", "bf16",
           "--causal", "--lengths", "1024,2048,4096", "--warmup", "3", "--reps", "10"]
    rc, tail = run_command(cmd, ctx, timeout)
    if rc != 0:
        raise RuntimeError(f"polytask bench triton exit status {rc}: "
                           f"{' '.join(tail.split()[-60:])}")
    lines = [line for line in tail.splitlines() if line.strip()]
    if any("skipped" in line for line in lines):
        raise AssertionError("; ".join(line for line in lines if "skipped" in line))
    return {"command": " ".join(cmd[1:]), "table": lines}


def step_train_curves(ctx: Context, timeout: float) -> dict:
    steps, cpu_steps, window = (200, 60, 20) if ctx.cuda else (8, 6, 2)
    device, bf16 = ("cuda", True) if ctx.cuda else ("cpu", True)
    runs = gpu_curves.run_pair(ctx.root, ctx.work, ctx.env(), device=device, bf16=bf16,
                               steps=steps, cpu_steps=cpu_steps, timeout=timeout)
    gpu, cpu = runs["gpu"]["loss"], runs["cpu"]["loss"]
    details = {**runs, **gpu_curves.compare(gpu, cpu, steps=steps, window=window),
               "window": window, "steps": steps, "cpu_steps": cpu_steps}
    if runs["timed_out"]:
        details["failures"].insert(0, f"the {device} run did not end within {timeout:.0f} s")
    elif runs["gpu"]["returncode"] != 0:
        details["failures"].insert(0, f"the {device} run exited with status "
                                      f"{runs['gpu']['returncode']}: "
                                      f"{' '.join(runs['gpu']['output_tail'].split()[-40:])}")
    if details["failures"]:
        raise Failed("; ".join(details["failures"]), details)
    return details


# name -> (budget in seconds, step)
STEPS: dict[str, tuple[float, Callable[[Context, float], dict]]] = {
    "triton_cuda": (200, step_triton_cuda),
    "per_task_gradients_cuda": (45, step_per_task_gradients),
    "train_curves": (100, step_train_curves),
    "bench_attention": (60, step_bench_attention),
    "bench_train": (75, step_bench_train),
    "bench_triton": (45, step_bench_triton),
    "triton_tests_gpu": (150, step_triton_tests_gpu),
}


def run_step(name: str, ctx: Context) -> dict:
    """Run one step within its budget and what is left before the deadline; never raises."""
    budget, fn = STEPS[name]
    timeout = min(budget, ctx.deadline - time.monotonic())
    record = {"name": name, "status": "pass", "seconds": 0.0, "budget_s": budget,
              "error": None, "reason": None, "details": {}}
    if timeout < 5:
        record.update(status="skip", reason="no time left before the run's deadline (--budget)")
        return record
    start = time.monotonic()
    try:
        record["details"] = fn(ctx, timeout)
    except Skip as why:
        record.update(status="skip", reason=str(why))
    except Exception as err:  # noqa: BLE001 - one failing step must not stop the others
        record.update(status="fail", error=f"{type(err).__name__}: {err}",
                      details=getattr(err, "details", {}))
        if not isinstance(err, (AssertionError, TimeoutError, RuntimeError)):
            record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = time.monotonic() - start
    return record


def environment() -> dict:
    """Versions and the device, for the record."""
    import torch
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "cpus": os.cpu_count()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=props.total_memory / 2**30, device_count=torch.cuda.device_count())
    return env


def install_hint(root: Path, env: dict) -> str:
    """The one line that says why there is no CUDA here and which command fixes it."""
    pinned = re.search(r"torch==([\w.]+)", (root / ".ci" / "run").read_text()) \
        if (root / ".ci" / "run").is_file() else None
    version = pinned.group(1) if pinned else env["torch"].split("+")[0]
    if env["torch_cuda"] is None:
        return (f"torch {env['torch']} is a CPU build; install the CUDA build of the pinned "
                f"torch (PyPI's Linux wheel) and the project, then rerun: python -m pip "
                f"uninstall -y torch && python -m pip install torch=={version} && python -m pip "
                f"install -e '.[test,triton]'   (or .ci/gpu-check --dry-run to check the "
                f"script on a CPU)")
    return (f"torch {env['torch']} is built for CUDA {env['torch_cuda']} but finds no GPU: "
            f"check nvidia-smi and CUDA_VISIBLE_DEVICES (or .ci/gpu-check --dry-run to check "
            f"the script on a CPU)")


def summary(result: dict) -> str:
    lines = [f"gpu-check ({result['mode']}) on {result['environment'].get('device', 'cpu')}: "
             + ", ".join(f"{result['summary'][s]} {s}" for s in STATUSES)
             + f" in {result['seconds']:.0f} s"]
    for s in result["steps"]:
        note = s["error"] or s["reason"] or ""
        lines.append(f"  {s['status']:<5} {s['name']:<24} {s['seconds']:>6.1f} s  {note[:150]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=".ci/gpu-check", description=__doc__.split("\n")[0]
                                .replace("``", ""))
    p.add_argument("json", nargs="?", default="gpu-check.json", help="where to write the record")
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes on the CPU: checks that the script itself works")
    p.add_argument("--only", nargs="+", choices=list(STEPS), default=None, metavar="STEP",
                   help=f"run these steps only (default: all, in order: {', '.join(STEPS)})")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole run (default 450: under 8 minutes with startup)")
    p.add_argument("--root", type=Path, default=ROOT,
                   help="the repository checkout (its tests/ and experiments/configs/)")
    args = p.parse_args(argv)
    start = time.monotonic()
    env = environment()
    result = {"schema": SCHEMA, "mode": "dry-run" if args.dry_run else "gpu",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": env,
              "steps": [], "summary": {s: 0 for s in STATUSES}, "seconds": 0.0, "error": None}
    if not env["cuda_available"] and not args.dry_run:
        result["error"] = install_hint(args.root, env)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"gpu-check: no CUDA: {result['error']}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="polytask-gpu-check-") as work:
        ctx = Context(args.root.resolve(), Path(work), env["cuda_available"] and not args.dry_run,
                      "--dry-run" if env["cuda_available"] else "no CUDA",
                      deadline=start + args.budget)
        for name in args.only or list(STEPS):
            record = run_step(name, ctx)
            result["steps"].append(record)
            result["summary"][record["status"]] += 1
            result["seconds"] = time.monotonic() - start
            # written after every step, so a run cut short still leaves its record
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
            print(f"{record['status']:<5} {name} ({record['seconds']:.1f} s)", flush=True)
    print(summary(result))
    print(f"record: {args.json}")
    return 1 if result["summary"]["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
