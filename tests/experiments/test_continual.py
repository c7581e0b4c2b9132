"""Continual learning (experiments.continual): stages are runs chained by ``init:`` (weights
equal when nothing is added), replay fills its fraction of each batch with earlier tasks'
rows, EWC's anchors hold the stage's Fisher, resume skips finished stages, and the GEM
metrics (experiments.continual_metrics) on a hand-made matrix."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polytask.experiments.train as train_module
from polytask.experiments.config import RunConfig
from polytask.experiments.config_files import SECTIONS
from polytask.experiments.build import build_run
from polytask.experiments.continual import StageHooks, private_names, stage_config
from polytask.experiments.continual_metrics import (average_accuracy, backward_transfer,
                                                    continual_summary, forward_transfer)
from polytask.experiments.suite import load_suite
from polytask.experiments.train import train

COLLATE = train_module.collate
BASE = {
    "model": {"d_model": 32, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1,
              "d_ff": 64, "dropout": 0.0, "max_length": 64},
    "sharing": {"strategy": "hard"},
    "data": {"max_source_len": 48, "max_target_len": 16, "vocab_size": 60, "eval_examples": 4,
             "test_examples": 4},
    "train": {"max_steps": 2, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "eval_every": 2,
              "save_every": 2, "generation_max_tokens": 6},
}


def _specs(names, held_out=()):
    return [{**dataclasses.asdict(s), "held_out": s.name in held_out}
            for s in load_suite("tiny") if s.name in names]


def _cfg(**extra) -> RunConfig:
    data = copy.deepcopy(BASE)
    data.update(extra)
    return RunConfig.from_dict(data)


# ---------------------------------------------------------------- the GEM metrics, by hand

# rows: initial, after stage 1, 2, 3; columns a, b, c, d; stages [[a], [b, c], [d]]
MATRIX = [[10, 20, 30, 40],
          [80, 25, 35, 42],
          [60, 70, 90, 50],
          [50, 65, 80, 95]]
STAGE_OF = [1, 2, 2, 3]


def test_metrics_on_a_hand_made_matrix():
    assert average_accuracy(MATRIX, STAGE_OF) == (50 + 65 + 80 + 95) / 4
    # a learned in stage 1: 50 - 80; b, c in stage 2: 65 - 70, 80 - 90; d is the last stage's
    assert backward_transfer(MATRIX, STAGE_OF) == pytest.approx((-30 - 5 - 10) / 3)
    # b, c just before stage 2 (row 1) minus row 0; d before stage 3 (row 2) minus row 0
    assert forward_transfer(MATRIX, STAGE_OF) == pytest.approx((5 + 5 + 10) / 3)
    got = continual_summary(MATRIX, ["a", "b", "c", "d"], [["a"], ["b", "c"], ["d"]])
    assert got["accuracy_matrix"] == MATRIX and got["tasks"] == ["a", "b", "c", "d"]
    assert got["backward_transfer"] == backward_transfer(MATRIX, STAGE_OF)


def test_metrics_one_stage_has_no_transfer():
    assert backward_transfer([[1, 2], [3, 4]], [1, 1]) is None
    assert forward_transfer([[1, 2], [3, 4]], [1, 1]) is None
    assert average_accuracy([[1, 2], [3, 4]], [1, 1]) == 3.5


@pytest.mark.parametrize("matrix, stage_of, match", [
    ([[1, 2]], [1, 1], "initial row"),
    ([[1, 2], [3]], [1, 1], "row 1 has 1 scores for 2 tasks"),
    ([[1, 2], [3, 4]], [1, 2], "stage 2 is outside 1..1"),
])
def test_metrics_reject_bad_matrices(matrix, stage_of, match):
    with pytest.raises(ValueError, match=match):
        average_accuracy(matrix, stage_of)


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("section, match", [
    ({"stages": [["copy", "sort"], ["reverse", "parity"]]}, r"stages\[0\] names unknown task 'sort'; tasks: copy, reverse, parity"),
    ({"stages": [["copy", "reverse"], ["reverse", "parity"]]}, "task 'reverse' is in stage 0 and stage 1"),
    ({"stages": [["copy"], ["parity"]]}, "task 'reverse' is in no stage"),
    ({"stages": [["copy"], []]}, "non-empty lists of task names"),
    ({"stages": "copy"}, "non-empty lists of task names"),
    ({"stages": [["copy"], ["reverse", "parity"]], "continual": {"replay": 1.0}},
     r"continual.replay = 1.0 must be in \[0, 1\)"),
    ({"stages": [["copy"], ["reverse", "parity"]], "continual": {"replay": -0.1}},
     "continual.replay"),
    ({"stages": [["copy"], ["reverse", "parity"]],
      "continual": {"regularization": "ewc", "weight": -1.0}}, "continual.weight = -1.0"),
    ({"stages": [["copy"], ["reverse", "parity"]], "continual": {"regularization": "si"}},
     "continual.regularization"),
])
def test_bad_continual_config_is_one_line_error(section, match):
    with pytest.raises(ValueError, match=match) as err:
        RunConfig.from_dict(section)
    assert "\n" not in str(err.value)


def test_gradient_weighting_with_replay_refused(tmp_path):
    cfg = _cfg(tasks=_specs(["copy", "reverse"]), stages=[["copy"], ["reverse"]],
               weighting={"method": "pcgrad"}, continual={"replay": 0.5})
    with pytest.raises(ValueError, match="weighting.method = 'pcgrad'.*continual.replay"):
        train(cfg, cfg.specs(), tmp_path / "run", progress=False)


# ---------------------------------------------------------------- replay rows


def test_replay_rows_are_the_fraction_of_each_batch():
    hooks = StageHooks(["copy"], 0.25, None, [], 1.0)
    assert [hooks.replay_rows(m) for m in (4, 8, 16)] == [1, 2, 4]
    assert StageHooks(["copy"], 0.0, None, [], 1.0).replay_rows(16) == 0
    assert StageHooks([], 0.5, None, [], 1.0).replay_rows(16) == 0   # stage 1: nothing yet
    assert StageHooks(["copy"], 0.99, None, [], 1.0).replay_rows(4) == 3   # one own row


def _batches_of(monkeypatch, cfg, run_dir):
    """Train ``cfg`` and record the task of every training row, per batch and stage."""
    seen = []
    real = COLLATE

    def spy(rows, *args, **kw):
        seen.append([r.task for r in rows])   # train.py collates only training batches
        return real(rows, *args, **kw)
    monkeypatch.setattr(train_module, "collate", spy)
    train(cfg, cfg.specs(), run_dir, progress=False)
    return seen


@pytest.mark.parametrize("replay", [0.0, 0.5])
def test_replay_fraction_in_training_batches(tmp_path, monkeypatch, replay):
    cfg = _cfg(tasks=_specs(["copy", "reverse"]), stages=[["copy"], ["reverse"]],
               continual={"replay": replay})
    batches = _batches_of(monkeypatch, cfg, tmp_path / "run")
    stage2 = [b for b in batches if "reverse" in b]
    assert len(stage2) == 2 and all(len(b) == 4 for b in stage2)
    assert all(b.count("copy") == round(replay * 4) for b in stage2)
    assert all(set(b) == {"copy"} for b in batches if "reverse" not in b)   # stage 1
    if replay:   # deterministic given the seed
        assert _batches_of(monkeypatch, cfg, tmp_path / "again") == batches


# ---------------------------------------------------------------- stages = runs chained by init


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_stages_equal_separate_runs_chained_by_init(tmp_path, capsys):
    """Replay 0, no penalty: stage i is exactly the plain run of stage i's tasks (the others
    held out) from ``init:`` stage i-1 — the same weights, bit for bit, after every stage."""
    names = ["copy", "reverse"]
    cfg = _cfg(tasks=_specs(names), stages=[["copy"], ["reverse"]])
    run = tmp_path / "run"
    summary = train(cfg, cfg.specs(), run, progress=False)
    first = _cfg(tasks=_specs(names, held_out=["reverse"]))
    train(first, first.specs(), tmp_path / "a", progress=False)
    second = _cfg(tasks=_specs(names, held_out=["copy"]), init=str(tmp_path / "a"),
                  model={"dropout": 0.0})
    train(second, second.specs(), tmp_path / "b", progress=False)
    _assert_same_weights(run / "stage_1", tmp_path / "a")
    _assert_same_weights(run / "stage_2", tmp_path / "b")
    # stage 0 is the initial model stage 1 starts from: the same tokenizer, 0 steps
    assert json.loads((run / "stage_0" / "summary.json").read_text())["steps"] == 0
    assert (run / "stage_0" / "tokenizer.model").read_bytes() == \
        (run / "stage_1" / "tokenizer.model").read_bytes()
    # the matrix: row i is stage i's test score of every task (seen or not)
    rows = [json.loads((run / f"stage_{i}" / "summary.json").read_text())["test"]
            for i in range(3)]
    continual = summary["continual"]
    assert continual["accuracy_matrix"] == [[r[t] for t in names] for r in rows]
    assert continual["stages"] == [["copy"], ["reverse"]] and continual["tasks"] == names
    assert continual["backward_transfer"] == rows[2]["copy"] - rows[1]["copy"]
    assert continual["forward_transfer"] == rows[1]["reverse"] - rows[0]["reverse"]
    assert summary["test"]["continual/average"] == (rows[2]["copy"] + rows[2]["reverse"]) / 2
    assert json.loads((run / "summary.json").read_text()) == summary
    saved = json.loads((run / "config.json").read_text())
    assert saved["stages"] == [["copy"], ["reverse"]]
    assert RunConfig.from_dict(saved, resolve_init=False).stages == [["copy"], ["reverse"]]
    # eval / generate / export of the continual run read its last stage, and say so
    from polytask.experiments.cli import main
    assert main(["eval", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"is a continual run; using its last stage, {run / 'stage_2'}" in err
    assert json.loads(out) == json.loads((run / "stage_2" / "summary.json").read_text())["test"]


def test_stage_config_holds_out_other_stages(tmp_path):
    cfg = _cfg(tasks=_specs(["copy", "reverse", "parity"]),
               stages=[["copy"], ["reverse", "parity"]])
    held = lambda c: [s.name for s in c.specs() if s.held_out]
    zero = stage_config(cfg, 0, tmp_path)
    assert zero.train.max_steps == 0 and held(zero) == ["reverse", "parity"]
    assert stage_config(cfg, 1, tmp_path).init is None
    assert held(stage_config(cfg, 1, tmp_path)) == ["reverse", "parity"]
    assert [c.continual.stage for c in (zero, stage_config(cfg, 1, tmp_path))] == [0, 1]


def test_ewc_anchor_resume_and_carried_heads(tmp_path):
    """EWC over a classification stage: the anchor file holds theta and a non-negative Fisher
    (not the later task's fresh head); the next stage starts with the earlier task's trained
    head; resume re-runs nothing finished."""
    cfg = _cfg(tasks=_specs(["parity", "copy"]), stages=[["parity"], ["copy"]],
               continual={"regularization": "ewc", "weight": 10.0, "fisher_examples": 3,
                          "replay": 0.25})
    run = tmp_path / "run"
    train(cfg, cfg.specs(), run, progress=False)
    anchor = load_file(str(run / "stage_1" / "anchor.safetensors"))
    theta = {k[6:]: v for k, v in anchor.items() if k.startswith("theta.")}
    fisher = {k[7:]: v for k, v in anchor.items() if k.startswith("fisher.")}
    assert theta.keys() == fisher.keys() and any(k.startswith("heads.") for k in theta)
    assert all((f >= 0).all() for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    best = load_file(str(run / "stage_1" / "best.safetensors"))
    for k, v in theta.items():
        assert torch.equal(v, best[k]), k
    records = [json.loads(x) for x in (run / "stage_2" / "metrics.jsonl").read_text().splitlines()]
    penalties = [r["continual/penalty"] for r in records if "continual/penalty" in r]
    assert penalties[0] == 0.0 and penalties[-1] > 0   # zero at the anchor, then grows
    assert any("replay_loss/parity" in r for r in records)
    # stage 2 starts with stage 1's trained parity head (init: carries only the backbone)
    stage2 = stage_config(cfg, 2, run)
    (tmp_path / "probe").mkdir()
    _, _, model = build_run(stage2, stage2.specs(), tmp_path / "probe", fresh_tokenizer=True)
    heads = [n for n in private_names(model, ["parity"])]
    fresh = {n: p.detach().clone() for n, p in model.named_parameters() if n in heads}
    assert heads and not all(torch.equal(fresh[n], best[n]) for n in heads)
    StageHooks(["parity"], 0.0, run / "stage_1", [], 1.0).carry_over(model)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n].detach(), best[n]) for n in heads)
    # resume: the last stage lost its summary (killed after its last checkpoint)
    stamp = (run / "stage_1" / "summary.json").stat().st_mtime_ns
    (run / "stage_2" / "summary.json").unlink()
    (run / "summary.json").unlink()
    before = _weights(run / "stage_2")
    again = train(cfg, cfg.specs(), run, resume=True, progress=False)
    assert (run / "stage_1" / "summary.json").stat().st_mtime_ns == stamp
    assert again["continual"]["tasks"] == ["copy", "parity"]   # the run's task order
    after = _weights(run / "stage_2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, cfg.specs(), run, progress=False)


# ---------------------------------------------------------------- the ablation table


@pytest.mark.slow
@pytest.mark.skipif("continual" not in SECTIONS, reason="experiments/config_files.py SECTIONS "
                    "must list stages and continual for dotted continual.* keys")
def test_ablation_grid_over_strategies_has_continual_columns(tmp_path):
    from polytask.experiments.ablate import ablate
    data = copy.deepcopy(BASE)
    data.update(tasks=_specs(["copy", "reverse"]), stages=[["copy"], ["reverse"]],
                grid={"continual.regularization": ["none", "l2"], "continual.replay": [0.0, 0.5]},
                seeds=[0])
    (tmp_path / "abl.yaml").write_text(json.dumps(data))
    ablate(tmp_path / "abl.yaml", tmp_path / "out", progress=False)
    table = (tmp_path / "out" / "table.md").read_text()
    header = table.splitlines()[0]
    assert "continual/average" in header and "continual/backward_transfer" in header
    assert "continual.regularization=l2, continual.replay=0.5" in table
