"""``polytask compare``: ablation and run directories in one table (experiments.compare)."""
import csv
import json
import math
from pathlib import Path
from statistics import mean, stdev

import pytest
from scipy import stats

from polytask.experiments.cli import main
from polytask.experiments.compare import compare


def _summary(test, metrics=None, status="ok"):
    if status != "ok":
        return {"status": status, "steps": 3, "reason": "nan"}
    return {"status": "ok", "test": test, "metrics": metrics or {}, "held_out": []}


def _write_run(run_dir: Path, summary) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _ablation(root: Path, runs: dict, combinations: dict | None = None) -> Path:
    """An ablation directory as ablate() leaves it: runs/NAME/summary.json, and results.csv
    naming each run's combination when ``combinations`` is given."""
    for name, summary in runs.items():
        _write_run(root / "runs" / name, summary)
    if combinations is not None:
        with open(root / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["combination", "seed", "run", "task", "metric",
                                              "value"])
            w.writeheader()
            for name, combo in combinations.items():
                for task, value in runs[name].get("test", {}).items():
                    w.writerow({"combination": combo, "seed": 0, "run": name, "task": task,
                                "metric": "m", "value": value})
    return root


def _ci(values):
    return stats.t.ppf(0.975, len(values) - 1) * stdev(values) / math.sqrt(len(values))


HARD = [80.0, 83.0, 87.0]
NONE = [70.0, 71.0]
METRICS = {"copy": "exact_match", "parity": "accuracy"}


@pytest.fixture
def dirs(tmp_path):
    a = _ablation(tmp_path / "abl_a", {
        **{f"strategy-hard_seed-{i}": _summary({"copy": v, "parity": 50.0 + i,
                                                "average_seen": (v + 50.0 + i) / 2}, METRICS)
           for i, v in enumerate(HARD)},
        **{f"strategy-none_seed-{i}": _summary({"copy": v, "parity": 60.0,
                                                "average_seen": (v + 60.0) / 2}, METRICS)
           for i, v in enumerate(NONE)},
        "strategy-none_seed-9": _summary(None, status="non-finite"),
    }, combinations={**{f"strategy-hard_seed-{i}": "sharing.strategy=hard" for i in range(3)},
                     **{f"strategy-none_seed-{i}": "sharing.strategy=none" for i in range(2)}})
    # an interrupted ablation without results.csv, with a task the first never scored
    b = _ablation(tmp_path / "abl_b", {
        "method-famo_seed-0": _summary({"copy": 90.0, "reverse": 40.0, "average_seen": 65.0},
                                       {"copy": "exact_match", "reverse": "exact_match"}),
        "method-famo_seed-1": _summary({"copy": 92.0, "reverse": 44.0, "average_seen": 68.0}),
    })
    run = tmp_path / "single"
    _write_run(run, _summary({"copy": 55.5, "parity": 75.0, "average_seen": 65.25}, METRICS))
    return a, b, run


def _table(text):
    """{(source, setting): {column: cell}} of the markdown table."""
    lines = [l for l in text.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[(Path(cells[0]).name, cells[1])] = dict(zip(header, cells))
    return header, out


def test_table_rows_columns_and_cells(dirs):
    a, b, run = dirs
    header, table = _table(compare([a, b, run]))
    assert header == ["source", "setting", "runs", "copy (exact_match)", "parity (accuracy)",
                      "reverse (exact_match)", "average_seen"]
    assert list(table) == [("abl_a", "sharing.strategy=hard"), ("abl_a", "sharing.strategy=none"),
                           ("abl_b", "method-famo"), ("single", "(run)")]
    hard = table[("abl_a", "sharing.strategy=hard")]
    assert hard["runs"] == "3"
    assert hard["copy (exact_match)"] == f"{mean(HARD):.1f} ± {_ci(HARD):.1f}"
    assert hard["parity (accuracy)"] == f"51.0 ± {_ci([50.0, 51.0, 52.0]):.1f}"
    none = table[("abl_a", "sharing.strategy=none")]
    assert none["runs"] == "2"   # the non-finite run is left out ...
    assert none["copy (exact_match)"] == f"{mean(NONE):.1f} ± {_ci(NONE):.1f}"
    famo = table[("abl_b", "method-famo")]
    assert famo["reverse (exact_match)"] == f"42.0 ± {_ci([40.0, 44.0]):.1f}"
    assert famo["parity (accuracy)"] == "—"            # a task the source never scored
    assert hard["reverse (exact_match)"] == "—"
    assert table[("single", "(run)")]["copy (exact_match)"] == "55.5"   # one run: no interval
    assert table[("single", "(run)")]["average_seen"] == "65.2"


def test_left_out_runs_are_footnoted(dirs):
    a, b, run = dirs
    assert "Left out: 1 run(s)" in compare([a, run])
    assert "Left out" not in compare([b, run])


def test_cli_prints_the_table_and_writes_csv(dirs, tmp_path, capsys):
    a, b, run = dirs
    out = tmp_path / "cmp.csv"
    assert main(["compare", str(a), str(b), str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == compare([a, b, run])
    rows = list(csv.DictReader(out.open()))
    assert [(r["setting"], r["runs"]) for r in rows] == [
        ("sharing.strategy=hard", "3"), ("sharing.strategy=none", "2"), ("method-famo", "2"),
        ("(run)", "1")]
    assert float(rows[0]["copy"]) == pytest.approx(mean(HARD))
    assert float(rows[0]["copy ci95"]) == pytest.approx(_ci(HARD), abs=1e-4)
    assert rows[2]["parity"] == "" and rows[3]["copy ci95"] == ""
    md = tmp_path / "cmp.md"
    assert main(["compare", str(a), "--out", str(md)]) == 0
    assert md.read_text() == compare([a])


@pytest.mark.parametrize("make, expected", [
    (lambda p: p / "missing", "no such directory"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "neither a run directory"),
    (lambda p: _write_run(p / "bad", [1, 2]) or p / "bad", "not a run summary"),
    (lambda p: _write_run(p / "bad2", {"status": "ok", "test": {"copy": "high"}}) or p / "bad2",
     "'test' must map task names to numbers"),
    (lambda p: (p / "bad3").mkdir() or (p / "bad3" / "summary.json").write_text("{") and
     p / "bad3", "invalid JSON"),
])
def test_bad_directories_are_one_line_errors(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polytask: error: ") and str(path) in err and expected in err
    assert err.count("\n") == 1


def test_bad_out_format_is_refused_before_reading(dirs, tmp_path, capsys):
    a, _, _ = dirs
    assert main(["compare", str(a), "--out", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert "t.txt" in err and ".md or .csv" in err and err.count("\n") == 1
    assert not (tmp_path / "t.txt").exists()
