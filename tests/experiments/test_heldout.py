"""The held-out protocol: held-out tasks are scored apart and never select checkpoints; the final
test scores every example unless capped, and records how many; unknown splits are errors."""
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest

from polytask.experiments import report
from polytask.experiments.cli import main
from polytask.experiments.config import load_config
from polytask.experiments.runs import evaluate_run, resolve_tasks, train_run
from polytask.experiments.suite import split_sizes
from polytask.experiments.table import markdown_table

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
# 5 validation examples: flipping every label turns accuracy x into 100 - x, never equal
FAST = ["train.max_steps=4", "train.eval_every=1", "train.save_every=4", "data.eval_examples=5",
        "data.test_examples=5", "train.batch_size=8", "model.d_model=32", "model.d_ff=64",
        "model.n_encoder_layers=1", "model.n_decoder_layers=1", "train.generation_max_tokens=4"]
HELD = "parity"   # a rank head has no parameters of its own: scored through the shared layers
SEEN = ("copy", "reverse")


def _specs(cfg, validation: str | None = None):
    """The tiny suite with ``parity`` held out (rank head), its validation file replaced."""
    out = []
    for s in resolve_tasks(cfg):
        if s.name == HELD:
            files = dict(s.files, **({"validation": validation} if validation else {}))
            s = replace(s, held_out=True, head="rank", files=files)
        out.append(s)
    return out


def _flipped(path: str, out: Path) -> str:
    flip = {"even": "odd", "odd": "even"}
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    out.write_text("".join(json.dumps({**r, "output": flip[r["output"]]}) + "\n" for r in rows))
    return str(out)


def _validation(run_dir: Path) -> list[dict]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "eval" and r["split"] == "validation"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs that differ only in the held-out task's validation labels."""
    tmp = tmp_path_factory.mktemp("heldout")
    cfg = load_config(TINY, FAST)
    original = _specs(cfg)
    flipped = _specs(cfg, _flipped(original[2].files["validation"], tmp / "flipped.jsonl"))
    a = train_run(replace(cfg, tasks=original), tmp / "a", progress=False)
    b = train_run(replace(cfg, tasks=flipped), tmp / "b", progress=False)
    return tmp, a, b


def test_held_out_validation_never_selects_checkpoints(runs):
    tmp, a, b = runs
    va, vb = _validation(tmp / "a"), _validation(tmp / "b")
    assert len(va) == len(vb) == 4
    # precondition (not vacuous): the held-out task's validation scores did change ...
    assert all(x[HELD] + y[HELD] == pytest.approx(100.0) for x, y in zip(va, vb))
    assert any(x[HELD] != y[HELD] for x, y in zip(va, vb))
    # ... yet neither the selection criterion, the chosen checkpoint nor any seen metric did
    assert a["best_step"] == b["best_step"]
    assert a["best_validation"] == b["best_validation"]
    for x, y in zip(va, vb):
        assert {k: x[k] for k in (*SEEN, "average_seen")} == {k: y[k] for k in (*SEEN, "average_seen")}
    assert {t: a["test"][t] for t in SEEN} == {t: b["test"][t] for t in SEEN}


def test_summary_reports_seen_and_held_out_averages_apart(runs):
    _, a, _ = runs
    test = a["test"]
    assert test["average_seen"] == pytest.approx(sum(test[t] for t in SEEN) / 2)
    assert test["average_held_out"] == pytest.approx(test[HELD])
    assert "average" not in test            # would mix seen and held-out tasks
    assert a["held_out"] == [HELD]
    assert a["examples"] == {"test": {"copy": 5, "reverse": 5, HELD: 5}}   # data.test_examples


def test_table_marks_held_out_columns_and_footnotes_examples(runs):
    tmp, a, _ = runs
    rows = [{"combination": "sharing.strategy=hard", "seed": "0", "task": t, "value": str(v)}
            for t, v in a["test"].items()]
    held, examples = report.run_notes([a])
    table = markdown_table(rows, a["metrics"], held, examples)
    header = table.splitlines()[0]
    assert f"| {HELD}† (accuracy) |" in header and "| copy (exact_match) |" in header
    assert "| average_seen | average_held_out |" in header and "| average |" not in header
    assert f"† held out ({HELD})" in table
    assert "Test examples scored per task: copy 5, reverse 5, parity 5." in table


def test_table_without_held_out_tasks_keeps_the_plain_average():
    rows = [{"combination": "c", "seed": "0", "task": t, "value": v}
            for t, v in (("copy", "10"), ("average", "10"))]
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| setting | copy | average |"
    assert "†" not in table and "Test examples" not in table


@pytest.mark.parametrize("metric", ["average", "average_held_out", HELD])
def test_selection_on_held_out_tasks_is_refused(tmp_path, metric):
    cfg = load_config(TINY, FAST + [f"train.early_stopping_metric={metric}"])
    with pytest.raises(ValueError, match=f"early_stopping_metric = '{metric}' is refused"):
        train_run(replace(cfg, tasks=_specs(cfg)), tmp_path / "run", progress=False)


@pytest.mark.parametrize("strategy", ["none", "soft"])
def test_held_out_task_on_an_untrained_column_is_refused(tmp_path, strategy):
    cfg = load_config(TINY, FAST + [f"sharing.strategy={strategy}"])
    with pytest.raises(ValueError, match=f"held-out task '{HELD}' would be scored on .* "
                                         f"sharing.strategy = '{strategy}'"):
        train_run(replace(cfg, tasks=_specs(cfg)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # refused before training


def test_final_test_scores_every_example_by_default(tmp_path):
    cfg = load_config(TINY, [o for o in FAST if not o.startswith("data.test_examples")]
                      + ["train.max_steps=0", "data.vocab_size=48"])
    assert cfg.data.test_examples is None
    copy = [s for s in resolve_tasks(cfg) if s.name == "copy"]
    summary = train_run(replace(cfg, tasks=copy), tmp_path / "run", progress=False)
    assert summary["examples"] == {"test": {"copy": split_sizes("copy")["test"]}}
    assert split_sizes("copy")["test"] > cfg.data.eval_examples   # the cap would have applied


def test_test_examples_must_be_positive():
    with pytest.raises(ValueError, match="data.test_examples = 0 must be positive"):
        load_config(TINY, ["data.test_examples=0"])


def test_eval_of_an_unknown_split_is_an_error(runs, capsys):
    tmp, _, _ = runs
    assert main(["eval", str(tmp / "a"), "--split", "bogus"]) == 2   # refused before loading
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["polytask: error: polytask eval: argument --split: invalid choice: 'bogus' "
                   "(choose from 'train', 'validation', 'test')"]
    with pytest.raises(ValueError, match="no task of this run has a 'bogus' split; splits: "
                       "train, validation, test"):   # the library's own check
        evaluate_run(tmp / "a", split="bogus")
