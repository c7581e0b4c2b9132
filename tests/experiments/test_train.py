"""The training loop: determinism, exact resume, non-finite guards, learning a task."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polytask import losses
from polytask.core.training.checkpoint import LATEST, latest_checkpoint
from polytask.experiments.config import load_config
from polytask.experiments.runs import resolve_tasks, train_run

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
FAST = ["train.max_steps=6", "train.eval_every=3", "train.save_every=3", "data.eval_examples=4",
        "train.batch_size=8", "model.d_model=32", "model.d_ff=64", "train.generation_max_tokens=8"]


def _records(run_dir):
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("tokens_per_s", None)  # wall-clock and memory measurements may differ
        rec.pop("step_s", None)
        rec.pop("max_rss_mb", None)
        out.append(rec)
    return out


def _assert_same_run(a, b):
    assert _records(a) == _records(b)
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_same_seed_gives_bit_identical_runs(tmp_path):
    cfg = load_config(TINY, FAST)
    train_run(cfg, tmp_path / "a", progress=False)
    train_run(cfg, tmp_path / "b", progress=False)
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    other = load_config(TINY, FAST + ["train.seed=1"])
    train_run(other, tmp_path / "c", progress=False)
    assert _records(tmp_path / "a") != _records(tmp_path / "c")


def test_resume_from_earlier_checkpoint_is_bit_identical(tmp_path):
    cfg = load_config(TINY, FAST)
    full = tmp_path / "full"
    summary = train_run(cfg, full, progress=False)
    assert summary["steps"] == 6
    # Rewind a copy of the finished run to its step-3 checkpoint, as if killed after step 3 ...
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "checkpoints" / LATEST).write_text("step-00000003")
    (part / "summary.json").unlink()
    (part / "model.safetensors").write_bytes((full / "checkpoints" / "step-00000003" / "model.safetensors").read_bytes())
    # ... and resume: steps 4-6 are recomputed from the restored state.
    resumed = train_run(cfg, part, resume=True, progress=False)
    _assert_same_run(full, part)
    assert resumed["test"] == summary["test"]


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    calls = {"n": 0}

    @losses.register("nan_every_other")
    class NanEveryOther(torch.nn.Module):  # a loss that blows up on every other call
        def __init__(self):
            super().__init__()
            self.inner = losses.get("generative")()

        def forward(self, logits, labels):
            calls["n"] += 1
            value = self.inner(logits, labels)
            return value * float("nan") if calls["n"] % 2 == 0 else value

    try:
        cfg = load_config(TINY, FAST + ["train.eval_every=100", "train.save_every=100"])
        specs = [replace(s, loss="nan_every_other") if s.name == "copy" else s
                 for s in resolve_tasks(cfg)]
        cfg = replace(cfg, tasks=specs)
        summary = train_run(cfg, tmp_path / "run", progress=False)
        finite = [r["finite"] for r in _records(tmp_path / "run") if r.get("event") == "train"]
        assert summary["bad_steps"] == finite.count(False) > 0
        for w in load_file(str(tmp_path / "run" / "model.safetensors")).values():
            assert torch.isfinite(w).all()
        # every step bad: the run stops after max_bad_steps consecutive ones
        calls["n"] = 1
        stop = replace(cfg, train=replace(cfg.train, max_bad_steps=2))
        NanEveryOther.forward = lambda self, logits, labels: self.inner(logits, labels) * float("nan")
        with pytest.raises(FloatingPointError, match="2 consecutive steps with non-finite"):
            train_run(stop, tmp_path / "stop", progress=False)
        assert latest_checkpoint(tmp_path / "stop") is None
    finally:
        losses.LOSSES._entries.pop("nan_every_other", None)


@pytest.mark.slow
def test_tiny_model_learns_copy_to_exact_match(tmp_path):
    """A 1+1-layer d_model 64 model learns the built-in copy task (digit sequences, one
    character per token) to 100% exact match on held-out test examples."""
    from polytask.experiments.suite import task_spec
    cfg = load_config(TINY, [
        "model.n_encoder_layers=1", "model.n_decoder_layers=1", "data.vocab_size=40",
        "data.max_source_len=48", "data.max_target_len=20", "data.eval_examples=64",
        "train.max_steps=400", "train.batch_size=32", "train.warmup_steps=20",
        "train.eval_every=100", "train.save_every=400", "train.generation_max_tokens=16"])
    cfg = replace(cfg, tasks=[task_spec("copy")])
    summary = train_run(cfg, tmp_path / "copy", progress=False)
    assert summary["test"]["copy"] == 100.0, summary


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run(tmp_path):
    """After warm-up, the resident-memory high-water mark stops growing: logging, sampling and
    evaluation keep nothing per step."""
    cfg = load_config(TINY, FAST + ["train.max_steps=300", "train.eval_every=50",
                                    "train.save_every=100"])
    train_run(cfg, tmp_path / "run", progress=False)
    rss = {r["step"]: r["max_rss_mb"] for r in json.loads(
        "[" + ",".join((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) + "]")
        if r.get("event") == "train"}
    assert rss[300] - rss[100] < 10.0, (rss[100], rss[300])  # MiB over 200 steps
