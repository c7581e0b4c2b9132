"""The ablation report's gradient-conflict outputs: ``gradient_conflicts.csv`` holds every logged
cosine, ``gradient_conflicts.png`` one heatmap per setting of the cosines averaged over seeds and
the second half's evaluations (tasks aligned by name), and neither exists without diagnostics."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from polytask.experiments import conflicts
from polytask.experiments.ablate import ablate, write_reports

TINY = Path(__file__).parents[2] / "experiments" / "configs" / "tiny.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def _event(step: int, tasks: list[str], upper: list[float]) -> dict:
    """A gradients event from the upper triangle of its cosine matrix (row by row)."""
    k = len(tasks)
    cos = np.eye(k)
    cos[np.triu_indices(k, 1)] = upper
    cos = np.triu(cos) + np.triu(cos, 1).T
    pairs = k * (k - 1) // 2
    return {"event": "gradients", "step": step, "tasks": tasks, "cosine": cos.tolist(),
            "conflict_fraction": sum(c < 0 for c in upper) / pairs, "grad_norm": [1.0] * k}


def _fake_ablation(out: Path, gradients: dict[tuple[str, int], list[dict]],
                   steps: int = 4) -> list[tuple[str, dict, int, None]]:
    """Run directories as training leaves them (train events, gradient events, summary.json)
    for ``{(weighting method, seed): events}``; -> the runs as ``write_reports`` takes them."""
    runs = []
    for (method, seed), events in gradients.items():
        name = f"method-{method}_seed-{seed}"
        run = out / "runs" / name
        run.mkdir(parents=True)
        lines = [{"event": "train", "step": s, "loss": 1.0} for s in range(1, steps + 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines + events))
        (run / "summary.json").write_text(json.dumps({"test": {"copy": 50.0, "reverse": 40.0}}))
        runs.append((name, {"weighting.method": method}, seed, None))
    return runs


# events at steps 2 (first half of 4 steps: in the CSV, not the figure) and 4; pcgrad's seed 1
# misses "parity" at step 4, so its copy-parity and reverse-parity pairs count 3 events, not 4
GRID = {("static", 0): [_event(2, ["copy", "reverse", "parity"], [0.9, 0.9, 0.9]),
                        _event(4, ["copy", "reverse", "parity"], [-0.2, 0.4, 0.1])],
        ("static", 1): [_event(2, ["copy", "reverse", "parity"], [0.9, 0.9, 0.9]),
                        _event(4, ["copy", "reverse", "parity"], [0.2, -0.3, -0.3])],
        ("pcgrad", 0): [_event(2, ["copy", "reverse", "parity"], [0.9, 0.9, 0.9]),
                        _event(3, ["copy", "reverse", "parity"], [-0.5, 0.5, -0.1]),
                        _event(4, ["copy", "reverse", "parity"], [0.1, 0.3, 0.5])],
        ("pcgrad", 1): [_event(4, ["reverse", "copy"], [-0.6])]}


def test_mean_cosines_averages_each_pair_over_the_events_that_hold_both_tasks():
    events = [_event(4, ["a", "b", "c"], [0.2, -0.4, 0.6]), _event(6, ["c", "a"], [0.8]),
              _event(8, ["b", "a"], [-0.1])]
    tasks, cos, count = conflicts.mean_cosines(events)
    assert tasks == ["a", "b", "c"]
    assert count.tolist() == [[3, 2, 2], [2, 2, 1], [2, 1, 2]]
    expected = [[1.0, (0.2 - 0.1) / 2, (-0.4 + 0.8) / 2],
                [(0.2 - 0.1) / 2, 1.0, 0.6],
                [(-0.4 + 0.8) / 2, 0.6, 1.0]]
    np.testing.assert_allclose(cos, expected, rtol=0, atol=1e-12)
    # a pair that never met is NaN (a grey cell), not 0 (no conflict)
    tasks, cos, count = conflicts.mean_cosines([_event(2, ["a", "b"], [0.5]),
                                                _event(4, ["a", "c"], [-0.5])])
    assert count[1, 2] == 0 and math.isnan(cos[1, 2]) and math.isnan(cos[2, 1])
    assert cos[0, 1] == 0.5 and cos[0, 2] == -0.5


def test_second_half_and_read_gradients(tmp_path):
    events = [_event(s, ["a", "b"], [0.1 * s]) for s in (1, 2, 3, 4)]
    assert [e["step"] for e in conflicts.second_half(events, 4)] == [3, 4]
    assert [e["step"] for e in conflicts.second_half(events, 5)] == [3, 4]
    assert [e["step"] for e in conflicts.second_half(events, 1)] == [1, 2, 3, 4]
    path = tmp_path / "metrics.jsonl"
    again = _event(2, ["a", "b"], [-0.7])            # a resumed run re-logs step 2: it wins
    recs = [{"event": "train", "step": s} for s in (1, 2, 3)] + events[:2] + [again]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    read, last = conflicts.read_gradients(path)
    assert last == 3 and [e["step"] for e in read] == [1, 2] and read[1] == again
    assert conflicts.read_gradients(tmp_path / "absent.jsonl") == ([], 0)
    bad = dict(events[0], cosine=[[1.0, 0.1]])
    path.write_text(json.dumps({"event": "train", "step": 1}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: .*1 rows for 2 tasks"):
        conflicts.read_gradients(path)


def test_report_averages_the_second_half_over_seeds_and_logs_every_cosine(tmp_path, monkeypatch):
    drawn = {}
    real_plot = conflicts.plot_conflicts
    def spy(settings, path, without=None):
        drawn.update(settings=settings, without=without)
        real_plot(settings, path, without)
    monkeypatch.setattr(conflicts, "plot_conflicts", spy)
    paths = write_reports(tmp_path, _fake_ablation(tmp_path, GRID))

    png = paths["conflicts"]
    assert png == tmp_path / "gradient_conflicts.png" and png.read_bytes()[:8] == PNG
    import matplotlib.image
    height, width = matplotlib.image.imread(png).shape[:2]
    assert 500 <= width <= 3000 and 300 <= height <= 2000     # two panels, readable at 150 dpi

    # the CSV: every pair of every event, exactly as logged
    rows = list(csv.DictReader(open(paths["conflicts_csv"])))
    assert list(rows[0]) == conflicts.CONFLICT_FIELDS
    logged = {(m, s, e["step"], e["tasks"][i], e["tasks"][j]): (e["cosine"][i][j],
                                                                 e["conflict_fraction"])
              for (m, s), events in GRID.items() for e in events
              for i in range(len(e["tasks"])) for j in range(i + 1, len(e["tasks"]))}
    written = {(r["setting"].split("=")[1], int(r["seed"]), int(r["step"]), r["task_a"],
                r["task_b"]): (float(r["cosine"]), float(r["conflict_fraction"])) for r in rows}
    assert len(rows) == len(logged) == 3 * 7 + 1 and written == logged
    assert {r["step"] for r in rows if r["second_half"] == "1"} == {"3", "4"}

    # the figure: per setting, the second-half events of each run (step > 4 / 2)
    settings = drawn["settings"]
    assert list(settings) == ["weighting.method=static", "weighting.method=pcgrad"]
    assert [[e["step"] for e in run] for run in settings["weighting.method=pcgrad"]] == \
        [[3, 4], [4]]
    tasks, cos, count = conflicts.mean_cosines([e for r in settings["weighting.method=static"]
                                                for e in r])
    assert tasks == ["copy", "reverse", "parity"] and count.min() == 2
    np.testing.assert_allclose(cos[0, 1:], [0.0, 0.05], atol=1e-12)   # (-0.2+0.2)/2, (0.4-0.3)/2
    np.testing.assert_allclose(cos[1, 2], -0.1, atol=1e-12)           # (0.1-0.3)/2
    tasks, cos, count = conflicts.mean_cosines([e for r in settings["weighting.method=pcgrad"]
                                                for e in r])
    assert count[0, 1] == 3 and count[0, 2] == count[1, 2] == 2       # parity: 2 of 3 events
    np.testing.assert_allclose([cos[0, 1], cos[0, 2], cos[1, 2]],
                               [(-0.5 + 0.1 - 0.6) / 3, (0.5 + 0.3) / 2, (-0.1 + 0.5) / 2],
                               atol=1e-12)
    # conflict fraction per run = mean over its events, then mean ± std over the runs
    title = conflicts._conflict_title("weighting.method=pcgrad",
                                      settings["weighting.method=pcgrad"])
    fractions = [(2 / 3 + 0) / 2, 1.0]
    assert f"conflicting pairs {np.mean(fractions):.2f} ± {np.std(fractions, ddof=1):.2f} " \
           "(n=2 runs)" in title
    assert drawn["without"] == []


def test_no_gradient_lines_no_conflict_files(tmp_path):
    stale = [tmp_path / "gradient_conflicts.png", tmp_path / "gradient_conflicts.csv"]
    for path in stale:                                  # left by an earlier grid
        path.write_bytes(b"old")
    paths = write_reports(tmp_path, _fake_ablation(tmp_path, {("static", 0): [],
                                                              ("static", 1): []}))
    assert "conflicts" not in paths and "conflicts_csv" not in paths
    assert not any(p.exists() for p in stale) and paths["bars"].read_bytes()[:8] == PNG


def test_events_only_in_the_first_half_give_the_csv_but_no_figure(tmp_path):
    grid = {("static", 0): [_event(2, ["copy", "reverse"], [0.3])], ("pcgrad", 0): []}
    paths = write_reports(tmp_path, _fake_ablation(tmp_path, grid, steps=4))
    assert "conflicts" not in paths and not (tmp_path / "gradient_conflicts.png").exists()
    assert [r["cosine"] for r in csv.DictReader(open(paths["conflicts_csv"]))] == ["0.3"]


def test_ablate_end_to_end_writes_what_training_logged(tmp_path):
    overrides = ["grid.weighting.method=[static, pcgrad]", "seeds=[0]", "train.max_steps=4",
                 "train.eval_every=2", "train.save_every=4", "train.batch_size=12",
                 "data.eval_examples=2", "model.d_model=16", "model.n_heads=2",
                 "model.n_encoder_layers=1", "model.n_decoder_layers=1", "model.d_ff=32",
                 "train.generation_max_tokens=4"]
    paths = ablate(TINY, tmp_path, overrides, progress=False)
    assert paths["conflicts"].read_bytes()[:8] == PNG
    logged = {}
    for run in sorted((tmp_path / "runs").iterdir()):
        for e in conflicts.read_gradients(run / "metrics.jsonl")[0]:
            k = len(e["tasks"])
            logged.update({(run.name, e["step"], e["tasks"][i], e["tasks"][j]): e["cosine"][i][j]
                           for i in range(k) for j in range(i + 1, k)})
    rows = list(csv.DictReader(open(paths["conflicts_csv"])))
    assert {r["setting"] for r in rows} == {"weighting.method=static", "weighting.method=pcgrad"}
    assert {(r["run"], int(r["step"]), r["task_a"], r["task_b"]): float(r["cosine"])
            for r in rows} == logged and len(rows) == len(logged) > 0
