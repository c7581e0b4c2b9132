"""``polytask ablate`` on a tiny grid writes every output, and resumes instead of redoing."""
import csv
from pathlib import Path

from polytask.experiments.cli import main

ROOT = Path(__file__).parents[2]
TINY = ROOT / "experiments" / "configs" / "tiny.yaml"
ARGS = ["grid.sharing.strategy=[none, hard]", "seeds=[0, 1]", "train.max_steps=3",
        "train.eval_every=3", "train.save_every=3", "data.eval_examples=4", "train.batch_size=8",
        "model.d_model=32", "model.d_ff=64", "train.generation_max_tokens=6"]


def test_ablate_tiny_grid_writes_table_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", str(TINY), *ARGS, "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    runs = {r["run"] for r in rows}
    assert len(runs) == 4  # 2 strategies x 2 seeds
    # no held-out task: the legacy "average" equals "average_seen" (experiments.evaluate)
    assert {r["task"] for r in rows} == {"copy", "reverse", "parity", "average_seen", "average"}
    for run in runs:
        values = {r["task"]: r["value"] for r in rows if r["run"] == run}
        assert values["average"] == values["average_seen"]
    table = (out / "table.md").read_text()
    assert "sharing.strategy=hard" in table and "Δm (%)" in table and "**" in table
    assert "Grid: sharing.strategy ∈ {none, hard}; seeds {0, 1}, n=2 runs per setting" in table
    assert "Welch's t-test over seeds" in table
    settings = [r["setting"] for r in csv.DictReader(open(out / "table.csv"))]
    assert settings == ["sharing.strategy=none", "sharing.strategy=hard"]
    assert (out / "table.tex").read_text().count(r"\toprule") == 1
    for png in ("metrics.png", "validation_curves.png", "training_losses.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    # a second invocation finds every run complete and redoes nothing
    assert main(["ablate", str(TINY), *ARGS, "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 4
    assert "training" in printed


def test_parallel_jobs_give_the_runs_of_a_sequential_ablation(tmp_path, capsys):
    # conftest runs the tests with 1 torch thread; the workers get 1 thread too, so every run
    # must reproduce its sequential twin bit for bit.
    args = [a for a in ARGS if not a.startswith("grid.")] + ["grid.sharing.strategy=[hard]"]
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert main(["ablate", str(TINY), *args, "--out", str(seq), "--no-progress"]) == 0
    assert main(["ablate", str(TINY), *args, "--out", str(par), "--no-progress",
                 "--jobs", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 at a time, 1 thread(s) each" in printed and printed.count(": done in") == 2
    assert (seq / "results.csv").read_text() == (par / "results.csv").read_text()
