"""``polytask ablate`` on a tiny grid writes every output, and resumes instead of redoing."""
import csv
from pathlib import Path

from experiments.cli import main

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
    assert {r["task"] for r in rows} == {"copy", "reverse", "parity", "average"}
    table = (out / "table.md").read_text()
    assert "sharing.strategy=hard" in table and "Δ" in table and "**" in table
    for png in ("metrics.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    # a second invocation finds every run complete and redoes nothing
    assert main(["ablate", str(TINY), *ARGS, "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 4
    assert "training" in printed
