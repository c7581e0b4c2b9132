"""``polytask merge``: a ``sharing.strategy: none`` run from an ``init:`` checkpoint merged into
one hard-shared run that ``polytask eval`` and ``generate`` read like any other; sources that
cannot be merged are refused in one line (CLI exit status 2)."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from polytask.core.training.checkpoint import model_state
from polytask.experiments.build import _digests, init_backbone
from polytask.experiments.cli import main
from polytask.experiments.config import load_config
from polytask.experiments.merge import merge_runs
from polytask.experiments.runs import evaluate_run, load_run, train_run
from polytask.experiments.suite import load_suite

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
SMALL = ["model.d_model=32", "model.d_ff=64", "model.n_encoder_layers=1",
         "model.n_decoder_layers=1", "data.eval_examples=4", "train.batch_size=8",
         "train.generation_max_tokens=6", "train.eval_every=2", "train.save_every=2"]


def _train(path: Path, *overrides: str) -> Path:
    train_run(load_config(TINY, [*SMALL, *overrides]), path, progress=False)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two inits (untrained tiny runs, seeds 0 and 1) and a `none` run from each."""
    root = tmp_path_factory.mktemp("merge")
    init_a = _train(root / "init-a", "train.max_steps=0")
    init_b = _train(root / "init-b", "train.max_steps=0", "train.seed=1")
    none_a = _train(root / "none-a", f"init={init_a}", "sharing.strategy=none",
                    "train.max_steps=2")
    none_b = _train(root / "none-b", f"init={init_b}", "sharing.strategy=none",
                    "train.max_steps=2")
    return {"init-a": init_a, "none-a": none_a, "none-b": none_b, "root": root}


def _backbone(model, task):
    return model_state(model.for_column(task))


def test_a_merged_run_is_a_run_that_eval_and_generate_read(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    summary = merge_runs([runs["none-a"]], "ties", {"density": 0.5, "scale": 0.7}, out)
    assert summary["status"] == "ok" and summary["steps"] == 0
    assert set(summary["test"]) >= {"copy", "reverse", "parity", "average_seen"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["test"] == summary["test"]
    # polytask eval scores the saved weights exactly as the summary does
    assert evaluate_run(out) == pytest.approx(summary["test"])
    assert main(["eval", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx(summary["test"])
    assert main(["generate", str(out), "--task", "copy", "--input", "a b c"]) == 0
    assert capsys.readouterr().out.strip() != ""
    cfg, _, _, model = load_run(out)
    assert cfg.sharing.strategy == "hard" and cfg.train.max_steps == 0
    assert cfg.init == str(runs["init-a"])
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "ties" and record["options"] == {"density": 0.5, "scale": 0.7}
    assert record["sources"][0]["sha256"] == _digests(runs["init-a"])
    # the saved backbone is TIES of the init and the source's three columns
    from polytask.core.merging import ties
    base = model_state(init_backbone(str(runs["init-a"])))
    _, _, _, source = load_run(runs["none-a"])
    # parity's classifier never runs the decoder: its task vector there is zero
    tuned = [{**base, **_backbone(source, t)} for t in ("copy", "reverse", "parity")]
    assert set(_backbone(source, "parity")) < set(base)
    want = ties(base, tuned, density=0.5, scale=0.7)
    got = _backbone(model, "copy")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    # the classifier head comes from the source run, trained
    head, trained = model.head("parity").state_dict(), source.head("parity").state_dict()
    assert head and all(torch.equal(head[k], trained[k]) for k in head)
    pytest.importorskip("onnxruntime")
    assert main(["export", str(out), "--onnx", str(tmp_path / "onnx")]) == 0
    assert any((tmp_path / "onnx").iterdir())


def test_merging_one_single_task_run_returns_its_weights(runs, tmp_path):
    """A single-task run alone, task arithmetic with scale 1: its column, bit for bit."""
    cfg = load_config(TINY, [*SMALL, f"init={runs['init-a']}", "train.max_steps=2"])
    cfg = replace(cfg, tasks=[s for s in load_suite("tiny") if s.name == "copy"])
    train_run(cfg, tmp_path / "single", progress=False)
    out = tmp_path / "one"
    merge_runs([tmp_path / "single"], "task_arithmetic", {"scale": 1.0}, out)
    _, _, _, source = load_run(tmp_path / "single")
    _, _, _, merged = load_run(out)
    a, b = _backbone(source, "copy"), _backbone(merged, "copy")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = model_state(init_backbone(str(runs["init-a"])))
    assert not all(torch.equal(a[k], base[k]) for k in a)      # it did train


def test_runs_from_different_inits_are_refused_naming_both_digests(runs, tmp_path, capsys):
    a, b = _digests(runs["init-a"]), _digests(runs["none-b"] / ".." / "init-b")
    with pytest.raises(ValueError, match="start from different init: checkpoints") as err:
        merge_runs([runs["none-a"], runs["none-b"]], "task_arithmetic", {}, tmp_path / "x")
    message = str(err.value)
    assert "\n" not in message
    assert all(d in message for d in (*a.values(), *b.values()))
    assert not (tmp_path / "x").exists()      # nothing written
    status = main(["merge", str(runs["none-a"]), str(runs["none-b"]), "--method", "ties",
                   "--out", str(tmp_path / "y")])
    assert status == 2 and "different init: checkpoints" in capsys.readouterr().err


def test_a_run_without_init_is_refused(runs, tmp_path, capsys):
    status = main(["merge", str(runs["init-a"]), "--method", "task_arithmetic",
                   "--out", str(tmp_path / "z")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert f"{runs['init-a']}: the run has no init: checkpoint" in err


@pytest.mark.parametrize("argv,message", [
    (["--method", "average"], "invalid choice: 'average' (choose from 'task_arithmetic', "
                              "'ties', 'dare')"),
    (["--method", "ties", "--drop", "0.5"], "'ties' takes no option 'drop'"),
    (["--method", "dare", "--drop", "1.5"], "drop = 1.5; expected a number in [0, 1)"),
    (["--method", "ties", "--density", "0"], "density = 0.0; expected a number in (0, 1]"),
    (["--method", "dare"], "merge method 'dare' needs option 'drop' (no default)"),
    (["--method", "dare", "--drop", "0.1", "--combine", "mean"], "invalid choice: 'mean'"),
])
def test_cli_bad_options_exit_2_in_one_line(runs, tmp_path, capsys, argv, message):
    status = main(["merge", str(runs["none-a"]), *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_a_task_twice_and_a_finished_out_are_refused(runs, tmp_path):
    with pytest.raises(ValueError, match=r"task 'copy' is in both .*none-a and .*none-a"):
        merge_runs([runs["none-a"], runs["none-a"]], "task_arithmetic", {}, tmp_path / "t")
    with pytest.raises(ValueError, match=r"already holds a finished run; choose another --out"):
        merge_runs([runs["none-a"]], "task_arithmetic", {}, runs["none-b"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files \(notes.txt\) but is no unfinished merge"):
        merge_runs([runs["none-a"]], "task_arithmetic", {}, tmp_path / "other")


def test_an_unfinished_merge_is_redone(runs, tmp_path):
    out = tmp_path / "redo"
    merge_runs([runs["none-a"]], "dare", {"drop": 0.5, "seed": 1}, out)
    first = (out / "best.safetensors").read_bytes()
    (out / "summary.json").unlink()                         # as if killed before the end
    merge_runs([runs["none-a"]], "dare", {"drop": 0.5, "seed": 1}, out)
    assert (out / "best.safetensors").read_bytes() == first  # seeded: the same merge
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["validation", "test"]   # not appended twice


def test_an_ablation_with_merge_adds_merged_rows(tmp_path, runs):
    out = tmp_path / "abl"
    args = [*SMALL, f"init={runs['init-a']}", "grid.sharing.strategy=[none, hard]", "seeds=[0]",
            "train.max_steps=2", "merge.methods=[task_arithmetic, ties]", "merge.scale=0.5",
            "merge.density=0.5"]
    assert main(["ablate", str(TINY), *args, "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    combos = list(dict.fromkeys(r["combination"] for r in rows))
    assert combos == ["sharing.strategy=none", "sharing.strategy=hard",
                      "sharing.strategy=merged (task_arithmetic)",
                      "sharing.strategy=merged (ties)"]
    merged = {r["run"] for r in rows if "merged" in r["combination"]}
    assert merged == {"strategy-merged-task_arithmetic_seed-0", "strategy-merged-ties_seed-0"}
    record = json.loads((out / "runs" / "strategy-merged-ties_seed-0" / "merge.json").read_text())
    assert record["options"] == {"density": 0.5, "scale": 0.5}
    assert record["sources"][0]["run"].endswith("strategy-none_seed-0")
    table = (out / "table.md").read_text()
    assert "merged (ties)" in table and "merged (task_arithmetic)" in table


@pytest.mark.parametrize("extra,message", [
    (["merge.methods=[average]"], "merge.methods = ['average']; give a non-empty list of "
                                  "task_arithmetic, ties, dare"),
    (["merge.methods=[ties]", "merge.bogus=1"], "merge.bogus is not a merge option; known: "
                                                "methods, scale"),
    (["merge.methods=[ties]", "merge.density=2"], "merge (ties): density = 2; expected a "
                                                  "number in (0, 1]"),
    (["merge.methods=[ties]", "grid.sharing.strategy=[hard]"],
     "the ablation has none; add none to grid.sharing.strategy or drop merge:"),
    (["merge.methods=[ties]", "init=null"], "run strategy-none_seed-0: merge: needs init:"),
])
def test_bad_merge_sections_fail_before_any_run(runs, tmp_path, capsys, extra, message):
    out = tmp_path / "abl"
    args = [*SMALL, f"init={runs['init-a']}", "grid.sharing.strategy=[none]", "seeds=[0]",
            *extra]
    assert main(["ablate", str(TINY), *args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (out / "runs").exists()
