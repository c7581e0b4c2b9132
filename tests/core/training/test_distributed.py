"""Data parallelism: 2 CPU ranks under torchrun equal one process at the same global batch,
including the gradient weightings (PCGrad, GradNorm, UPGrad, IMTL with its learned loss scales),
whose per-task gradients come from the one-pass engine on each rank and are averaged across
ranks before the weighting combines them. ``POLYTASK_EVERY_WEIGHTING=1`` checks every registered
method (two minutes)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[3]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


CASES = [("pcgrad", "hard"), ("gradnorm", "hierarchical"), ("uncertainty", "soft"),
         ("upgrad", "hard"), ("imtl", "hierarchical"), ("static", "mmoe"), ("pcgrad", "ple"),
         ("static", "hard sharing.adapters={per: task, r: 2}")]   # per-task LoRA
if os.environ.get("POLYTASK_EVERY_WEIGHTING"):   # ~10 s each: every registered method, once
    from polytask import losses
    CASES += [(m, "hard") for m in losses.WEIGHTINGS.names()
              if m not in {c[0] for c in CASES} and m not in ("mgda_ub", "famo")]
    # mgda_ub runs in one process only; famo, under torchrun, observes the next step's losses
    # instead of re-running the step's (its docstring), so it differs from one process by design


@pytest.mark.slow
@pytest.mark.parametrize("weighting, strategy", CASES)
def test_two_ranks_equal_one_process(tmp_path, weighting, strategy):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    overrides = ["train.max_steps=3", "data.eval_examples=2", "train.eval_every=100",
                 "train.save_every=100", f"weighting.method={weighting}",
                 *(f"sharing.strategy={strategy}".split(" ", 1)), "train.batch_size=8",
                 "train.dtype=float64",
                 "model.n_encoder_layers=2", "model.n_decoder_layers=2"]
    cli = ["-m", "polytask.experiments.cli", "train", str(TINY), *overrides, "--no-progress"]
    _run([torchrun, "--standalone", "--nproc_per_node=2", *cli, "--out", "ddp"], tmp_path)
    _run([sys.executable, *cli, "--out", "single"], tmp_path)
    ddp = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert ddp.keys() == single.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-8, msg=name)
    # Training moved the parameters: the comparison is not between two untouched models.
    import json
    steps = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "train" and r["finite"] for r in steps) == 3


@pytest.mark.slow
def test_two_rank_resume_is_bit_identical(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    overrides = ["train.max_steps=4", "data.eval_examples=2", "train.eval_every=2",
                 "train.save_every=2", "train.batch_size=8", "weighting.method=pcgrad"]
    cli = ["-m", "polytask.experiments.cli", "train", str(TINY), *overrides, "--no-progress"]
    _run([torchrun, "--standalone", "--nproc_per_node=2", *cli, "--out", "full"], tmp_path)
    # Rewind a copy to its step-2 checkpoint, as if every rank had been killed after step 2.
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    part = tmp_path / "part"
    (part / "checkpoints" / "LATEST").write_text("step-00000002")
    (part / "summary.json").unlink()
    _run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "polytask.experiments.cli", "train",
          "--resume", "part", "--no-progress"], tmp_path)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(part / "model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
