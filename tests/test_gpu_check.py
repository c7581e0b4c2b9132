""".ci/gpu-check on the CPU: its dry run goes through every step end to end and writes the
record whose schema is checked here, CUDA steps report "skipped: no CUDA" instead of failing,
and its parts (step runner, deadline, timeouts, the loss-curve comparison, junit totals, the
no-CUDA message) behave as documented. The GPU run itself needs a GPU (see the script)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polytask.experiments.bench import gpu_check
from polytask.experiments.bench.gpu_check import (STATUSES, STEPS, Context, Skip, junit_counts,
                                                  run_command, run_step)
from polytask.experiments.bench.gpu_curves import FIRST_STEP_TOL, WINDOW_TOL, compare

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu-check"
STEP_KEYS = {"name", "status", "seconds", "budget_s", "error", "reason", "details"}


def _ctx(tmp_path, deadline=1e9) -> Context:
    return Context(ROOT, tmp_path, cuda=False, why_not="no CUDA", deadline=deadline)


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"record: {out}" in proc.stdout and "gpu-check (dry-run)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["schema"] == "polytask-gpu-check/1" and result["mode"] == "dry-run"
    assert result["error"] is None and result["seconds"] > 0
    assert {"python", "torch", "torch_cuda", "cuda_available", "triton"} <= \
        set(result["environment"])
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == list(STEPS)
    for s in steps.values():
        assert set(s) >= STEP_KEYS and s["status"] in STATUSES and s["seconds"] >= 0
        assert s["status"] != "fail", s
    assert sum(result["summary"].values()) == len(STEPS)
    why = "no CUDA" if not torch.cuda.is_available() else "--dry-run"
    for name in ("triton_cuda", "triton_tests_gpu", "bench_triton"):
        assert steps[name]["status"] == "skip" and steps[name]["reason"].startswith(why), name
    assert steps["triton_cuda"]["reason"].startswith(f"{why}: all ")   # its tests ran and skipped
    for name in ("train_curves", "bench_attention", "bench_train"):
        assert steps[name]["status"] == "pass", steps[name]
    curves = steps["train_curves"]["details"]
    assert len(curves["gpu"]["loss"]) == 8 and len(curves["cpu"]["loss"]) == 6
    assert curves["cpu"]["stopped"] and curves["gpu"]["bf16"] and not curves["cpu"]["bf16"]
    assert all(curves["checks"].values()) and len(curves["windows"]) == 3
    for name in ("bench_attention", "bench_train"):
        rows = [r for r in steps[name]["details"]["rows"] if "ms" in r]
        assert rows and all(r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_mib"] > 0
                            and 0 < r["fraction_of_peak"] for r in rows), name


def test_steps_are_recorded_pass_fail_skip_and_never_raise(tmp_path, monkeypatch):
    def ok(ctx, timeout):
        return {"figure": 1.5}

    def skipped(ctx, timeout):
        raise Skip("no CUDA: nothing to do")

    def failed(ctx, timeout):
        raise AssertionError("loss went up")

    def broken(ctx, timeout):
        return {}["missing"]

    steps = {"a": (10, ok), "b": (10, skipped), "c": (10, failed), "d": (10, broken)}
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    records = {n: run_step(n, _ctx(tmp_path)) for n in steps}
    assert all(set(r) >= STEP_KEYS for r in records.values())
    assert records["a"]["status"] == "pass" and records["a"]["details"] == {"figure": 1.5}
    assert records["b"]["status"] == "skip" and records["b"]["reason"] == "no CUDA: nothing to do"
    assert records["c"]["status"] == "fail"
    assert records["c"]["error"] == "AssertionError: loss went up"
    assert records["d"]["status"] == "fail" and records["d"]["error"].startswith("KeyError")
    assert "traceback" in records["d"] and "traceback" not in records["c"]
    # past the deadline a step is not started
    late = run_step("a", _ctx(tmp_path, deadline=time.monotonic()))
    assert late["status"] == "skip" and "no time left" in late["reason"]


def test_a_command_past_its_budget_is_killed(tmp_path):
    start = time.monotonic()
    rc, _ = run_command([sys.executable, "-c", "import time; time.sleep(60)"], _ctx(tmp_path), 1)
    assert rc is None and time.monotonic() - start < 30
    rc, out = run_command([sys.executable, "-c", "import os; print(os.environ.get("
                           "'TRITON_INTERPRET'), os.environ['CUDA_VISIBLE_DEVICES'] == '')"],
                          _ctx(tmp_path), 60)
    assert rc == 0 and out.split() == ["None", "True"]   # compiled kernels; no GPU in a dry run


def _curve(start, end, n):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def test_curve_comparison_passes_and_fails_for_the_right_reasons():
    cpu = _curve(10, 4, 60)
    gpu = [x * 1.01 for x in cpu] + _curve(4, 3, 140)     # 1% off bf16's way, then on to 200
    result = compare(gpu, cpu, steps=200, window=20)
    assert result["failures"] == [] and all(result["checks"].values())
    assert [w["steps"] for w in result["windows"]] == [[1, 20], [21, 40], [41, 60]]
    # not learning on the GPU
    flat = compare([10.0] * 200, cpu, steps=200, window=20)
    assert not flat["checks"]["decreasing"] and not flat["checks"]["band"]
    # the same start, then drifting away by more than the band
    drift = compare(cpu[:20] + [x * (1 + 2 * WINDOW_TOL) for x in cpu[20:]] + [3.0] * 140, cpu,
                    steps=200, window=20)
    assert drift["checks"]["first_step"] and not drift["checks"]["band"]
    assert "steps [21, 40]" in drift["failures"][0]
    # a different first loss: different weights or batch, not arithmetic
    first = compare([cpu[0] * (1 + 2 * FIRST_STEP_TOL)] + gpu[1:], cpu, steps=200, window=20)
    assert not first["checks"]["first_step"]
    # a CPU run too short to compare, a GPU run cut short, a NaN
    assert not compare(gpu, cpu[:30], steps=200, window=20)["checks"]["cpu_reached"]
    assert not compare(gpu[:150], cpu, steps=200, window=20)["checks"]["finite"]
    assert not compare(gpu[:-1] + [float("nan")], cpu, steps=200, window=20)["checks"]["finite"]


def test_junit_totals_failures_and_skip_reasons(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="1" '
        'skipped="2" tests="4"><testcase classname="t.a" name="ok"/>'
        '<testcase classname="t.a" name="bad"><failure message="assert 0"/></testcase>'
        '<testcase classname="t.b" name="s1"><skipped message="no CUDA"/></testcase>'
        '<testcase classname="t.b" name="s2"><skipped message="no CUDA"/></testcase>'
        '</testsuite></testsuites>')
    counts = junit_counts(xml)
    assert {k: counts[k] for k in ("tests", "failures", "errors", "skipped")} == \
        {"tests": 4, "failures": 1, "errors": 0, "skipped": 2}
    assert counts["failed"] == ["t.a::bad"] and counts["skip_reasons"] == ["no CUDA"]


PIN = re.search(r"torch==([\w.]+)", (ROOT / ".ci" / "run").read_text()).group(1)


@pytest.mark.parametrize("torch_cuda,expected", [
    (None, f"python -m pip uninstall -y torch && python -m pip install torch=={PIN} && "
           "python -m pip install -e '.[test,triton]'"),
    ("12.8", "is built for CUDA 12.8 but finds no GPU: check nvidia-smi"),
])
def test_without_cuda_it_says_which_command_to_run(tmp_path, monkeypatch, capsys, torch_cuda,
                                                   expected):
    env = {"python": "3", "torch": "2.13.0+cpu", "torch_cuda": torch_cuda,
           "cuda_available": False, "TRITON_INTERPRET": None, "cpus": 2, "triton": None}
    monkeypatch.setattr(gpu_check, "environment", lambda: env)
    out = tmp_path / "check.json"
    assert gpu_check.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-check: no CUDA: ") and expected in err and err.count("\n") == 1
    record = json.loads(out.read_text())
    assert record["steps"] == [] and expected in record["error"]


def test_script_is_executable_and_unsets_the_interpreter():
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert "unset TRITON_INTERPRET" in text and "polytask.experiments.bench.gpu_check" in text
