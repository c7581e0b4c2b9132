"""Crash safety: SIGKILL a training process at a random step, or in the middle of writing a
checkpoint; the previous checkpoint stays loadable and ``--resume`` ends bit-identical to an
uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polytask.core.training.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
ARGS = ["train.max_steps=12", "train.eval_every=4", "train.save_every=2", "data.eval_examples=4",
        "train.batch_size=8", "model.d_model=32", "model.d_ff=64", "train.generation_max_tokens=8"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "polytask.experiments.cli", *args, "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")]
    return max((r["step"] for r in lines if r.get("event") == "train"), default=0)


def _same(a, b):
    strip = lambda d: [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_s", "step_s", "max_rss_mb")}
                       for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = _cli("train", str(TINY), *ARGS, "--out", str(out))
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    return out


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume(tmp_path, uninterrupted):
    kill_at = random.Random(os.getpid()).randint(3, 10)
    run = tmp_path / "run"
    proc = _cli("train", str(TINY), *ARGS, "--out", str(run))
    while _steps(run) < kill_at and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    resumed = _cli("train", "--resume", str(run))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    _same(uninterrupted, run)


KILL_IN_SAVE = """
import os, signal, sys
import polytask.core.training.checkpoint as ck
original, calls = ck.save_file, {"n": 0}
def dying_save_file(tensors, filename):
    calls["n"] += 1
    if calls["n"] == int(os.environ["KILL_ON_SAVE"]):
        original(tensors, filename)
        with open(filename, "r+b") as f:      # a torn write: half the bytes, then death
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    original(tensors, filename)
ck.save_file = dying_save_file
from polytask.experiments.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, uninterrupted):
    run = tmp_path / "run"
    script = tmp_path / "dying.py"
    script.write_text(KILL_IN_SAVE)
    # Weights are written per checkpoint into its directory, then into the run directory, and
    # once per new best: write 1, 2 = step-2 checkpoint; 3 = best after the step-4 evaluation;
    # 4 = the step-4 checkpoint's own weights, so the process dies mid-checkpoint.
    proc = subprocess.Popen([sys.executable, str(script), "train", str(TINY), *ARGS, "--out",
                             str(run), "--no-progress"], env={**ENV, "KILL_ON_SAVE": "4"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.wait(timeout=600) == -signal.SIGKILL
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step-00000002"  # the torn one never became LATEST
    assert not (run / "checkpoints" / "step-00000004").exists()
    load_checkpoint(ckpt, _model_for(run))  # intact and loadable
    resumed = _cli("train", "--resume", str(run))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    _same(uninterrupted, run)


def _model_for(run):
    from polytask.experiments.runs import load_run
    return load_run(run)[3] if (run / "model.safetensors").exists() else None
