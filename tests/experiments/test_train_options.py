"""Training options end to end: PEFT and freezing keep frozen weights bit-identical, bf16
autocast runs, early stopping stops, and eval/generate work on a finished run directory."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polytask.experiments.runs import load_run
from polytask.experiments.cli import main
from polytask.experiments.config import load_config
from polytask.experiments.runs import train_run

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
FAST = ["train.max_steps=4", "train.eval_every=2", "train.save_every=4", "data.eval_examples=4",
        "train.batch_size=8", "model.d_model=32", "model.d_ff=64", "train.generation_max_tokens=6"]


def _initial_weights(cfg, tmp_path):
    """The weights a run starts from: the loop's own setup, with the same seed."""
    from polytask.core.training.checkpoint import model_state
    from polytask.experiments.build import build_run as setup
    from polytask.experiments.runs import resolve_tasks
    (tmp_path / "init").mkdir()
    _, _, model = setup(cfg, resolve_tasks(cfg), tmp_path / "init", fresh_tokenizer=True)
    return {k: v.clone() for k, v in model_state(model).items()}


@pytest.mark.parametrize("overrides, frozen, trained", [
    (["train.train_top_layers=1"], "slots.encoder_0.", "slots.encoder_1."),
    (["train.train_only=[decoder]"], "slots.encoder_0.", "decoder"),
])
def test_frozen_parameters_stay_bit_identical(tmp_path, overrides, frozen, trained):
    cfg = load_config(TINY, FAST + overrides)
    before = _initial_weights(cfg, tmp_path)
    train_run(cfg, tmp_path / "run", progress=False)
    after = load_file(str(tmp_path / "run" / "model.safetensors"))
    frozen_keys = [k for k in before if k.startswith(frozen)]
    trained_keys = [k for k in before if trained in k]
    assert frozen_keys and trained_keys
    assert all(torch.equal(before[k], after[k]) for k in frozen_keys)
    assert any(not torch.equal(before[k], after[k]) for k in trained_keys)


def test_bf16_autocast_and_early_stopping(tmp_path):
    cfg = load_config(TINY, FAST + ["train.bf16=true", "train.max_steps=40",
                                    "train.early_stopping_patience=1", "train.lr=1e-9"])
    summary = train_run(cfg, tmp_path / "run", progress=False)
    # with a learning rate of 1e-9 nothing improves: the second evaluation stops the run
    assert summary["steps"] == 4 and summary["best_step"] == 2


def test_lora_trains_only_adapters(tmp_path):
    cfg = load_config(TINY, FAST + ["train.peft={method: lora, r: 2, targets: [q_proj, v_proj]}"])
    summary = train_run(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 4
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any("lora" in k for k in state)


def test_eval_and_generate_commands_on_a_run(tmp_path, capsys):
    cfg = load_config(TINY, FAST)
    summary = train_run(cfg, tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # eval reloads the final weights; the summary used the best validation weights
    assert set(evaluated) == set(summary["test"])
    assert main(["generate", str(tmp_path / "run"), "--task", "reverse", "--input", "1 2 3"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--task", "nope", "--input", "x"]) == 2
    assert "unknown task 'nope'; tasks: copy, reverse, parity" in capsys.readouterr().err


def test_held_out_task_is_evaluated_but_never_trained(tmp_path):
    from dataclasses import replace
    from polytask.experiments.runs import resolve_tasks
    cfg = load_config(TINY, FAST)
    specs = [replace(s, held_out=s.name == "copy") for s in resolve_tasks(cfg)]
    summary = train_run(replace(cfg, tasks=specs), tmp_path / "run", progress=False)
    assert summary["held_out"] == ["copy"] and "copy" in summary["test"]  # zero-shot (FLAN)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = {k for r in records if r.get("event") == "train" for k in r if k.startswith("loss/")}
    assert trained and "loss/copy" not in trained


@pytest.mark.parametrize("method, observed", [("famo", True), ("static", False)])
def test_the_loop_hands_famo_the_losses_after_each_step(tmp_path, monkeypatch, method, observed):
    """FAMO's protocol (its authors' ``update(loss_after)``): after every optimizer step the
    loop re-scores the step's last micro-batch with the new parameters and calls
    ``after_step`` with those losses; weightings that do not override it cost no forward."""
    from polytask.experiments import train as train_module
    from polytask.losses.weighting.famo import FAMO
    seen = []
    original = FAMO.after_step
    monkeypatch.setattr(FAMO, "after_step",
                        lambda self, losses: seen.append(sorted(losses)) or original(self, losses))
    forwards = []
    real = train_module._after_step
    monkeypatch.setattr(train_module, "_after_step",
                        lambda *a: forwards.append(1) or real(*a))
    cfg = load_config(TINY, FAST + [f"weighting.method={method}"])
    train_run(cfg, tmp_path / "run", progress=False)
    assert len(forwards) == (4 if observed else 0)
    assert len(seen) == (4 if observed else 0)
    assert all(names and set(names) <= {"copy", "reverse", "parity"} for names in seen)
