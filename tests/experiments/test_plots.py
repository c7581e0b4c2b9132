"""The ablation figures: the pure pieces (smoothing, the band over seeds, the t interval, reading
a run's log) against closed forms, and every figure rendered from a small fake ablation as a
valid PNG of paper width, drawn only when its data exists."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from polytask.experiments import plots, stats
from polytask.experiments.ablate import write_reports

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


# --- smoothing --------------------------------------------------------------------------------

def test_smooth_is_a_trailing_mean_over_the_window():
    x = [4.0, 2.0, 6.0, 0.0, 8.0]
    # by hand: the mean of the last (up to) 3 values
    expected = [4.0, 3.0, 4.0, 8 / 3, 14 / 3]
    np.testing.assert_allclose(plots.smooth(x, 3), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(plots.smooth(x, 1), x)          # window 1: the raw curve
    np.testing.assert_allclose(plots.smooth(x, 99), np.cumsum(x) / np.arange(1, 6))
    with pytest.raises(ValueError, match="window must be at least 1, got 0"):
        plots.smooth(x, 0)


def test_smoothing_window_is_a_twentieth_of_the_steps():
    assert [plots.smoothing_window(n) for n in (1, 39, 40, 200, 1000)] == [1, 1, 2, 10, 50]


# --- the band over seeds ----------------------------------------------------------------------

def test_band_gives_mean_min_max_at_shared_steps():
    b = plots.band([[(10, 1.0), (20, 4.0)], [(10, 3.0), (20, 2.0)], [(10, 2.0), (20, 6.0)]])
    assert b["step"].tolist() == [10, 20] and b["n"].tolist() == [3, 3]
    np.testing.assert_allclose(b["mean"], [2.0, 4.0])
    assert b["min"].tolist() == [1.0, 2.0] and b["max"].tolist() == [3.0, 6.0]


def test_band_interpolates_missing_steps_and_drops_runs_that_ended():
    # seed b missed step 2 (its batch held no row of the task) and stopped at step 3
    b = plots.band([[(1, 0.0), (2, 2.0), (3, 4.0), (4, 6.0)], [(1, 2.0), (3, 8.0)]])
    assert b["step"].tolist() == [1, 2, 3, 4] and b["n"].tolist() == [2, 2, 2, 1]
    np.testing.assert_allclose(b["mean"], [1.0, (2.0 + 5.0) / 2, 6.0, 6.0])
    np.testing.assert_allclose(b["min"], [0.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(b["max"], [2.0, 5.0, 8.0, 6.0])


# --- the confidence interval (shared with table.md) -------------------------------------------

def test_error_bars_are_the_t_interval_of_the_mean():
    m, h = stats.mean_ci([1.0, 2.0, 3.0])
    # s = 1, n = 3; t(0.975, 2 dof) = 4.30265273 from a t table (8 digits)
    assert m == 2.0 and h == pytest.approx(4.30265273 / math.sqrt(3), rel=1e-8)
    values = [61.0, 58.5, 64.0, 60.25, 59.0]
    lo, hi = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                    scale=scipy_stats.sem(values))
    m, h = stats.mean_ci(values)
    assert (m - h, m + h) == pytest.approx((lo, hi), rel=1e-12)
    assert stats.mean_ci([42.0]) == (42.0, None)            # one seed: no interval, no bar


# --- reading a run ----------------------------------------------------------------------------

def test_read_run_splits_losses_weights_and_validation_and_the_last_record_wins(tmp_path):
    records = [
        {"event": "train", "step": 1, "loss": 3.0, "loss/a": 2.0, "loss/b": 1.0,
         "weight/a": 0.5, "weight/b": 1.5},
        {"event": "train", "step": 2, "loss": 9.0, "loss/a": 9.0, "weight/a": 0.5},
        {"event": "eval", "split": "validation", "step": 2, "a": 10.0, "b": 20.0,
         "average_seen": 15.0},
        {"event": "train", "step": 2, "loss": 1.0, "loss/a": 1.0, "weight/a": 0.25},  # resumed
        {"event": "eval", "split": "test", "step": 2, "a": 99.0},
        {"event": "gradients", "step": 2, "tasks": ["a", "b"], "cosine": [[1, 0], [0, 1]]},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"test": {"a": 99.0}}))
    run = plots.read_run(tmp_path)
    assert run.loss == {"a": [(1, 2.0), (2, 1.0)], "b": [(1, 1.0)]}
    assert run.weight == {"a": [(1, 0.5), (2, 0.25)], "b": [(1, 1.5)]}
    assert run.validation == {"a": [(2, 10.0)], "b": [(2, 20.0)], "average_seen": [(2, 15.0)]}
    assert run.summary == {"test": {"a": 99.0}}
    assert plots._weighted(run, "a") == [(1, 1.0), (2, 0.25)]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        plots.read_run(tmp_path)


# --- the figures ------------------------------------------------------------------------------

TASKS = {"copy": "exact_match", "reverse": "exact_match", "parity": "accuracy", "qa": "f1"}


def _fake_run(run: Path, seed: int, method: str, steps: int = 60, held: str | None = "qa",
              validation: bool = True) -> None:
    """A run directory as training leaves it: per-task losses (a task missing from some steps)
    and weights, validation every 10 steps, summary.json with metric names and test scores."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True)
    trained = [t for t in TASKS if t != held]
    lines = []
    for s in range(1, steps + 1):
        present = [t for t in trained if (s + len(t)) % 5]            # gaps, as in mixed batches
        w = {t: (1.0 if method == "static" else 0.5 + 0.1 * k) for k, t in enumerate(present)}
        lines.append({"event": "train", "step": s, "loss": 0.0,
                      **{f"loss/{t}": 3 * math.exp(-s / 20) + rng.uniform(0, .3) for t in present},
                      **{f"weight/{t}": w[t] for t in present}})
        if validation and s % 10 == 0:
            lines.append({"event": "eval", "split": "validation", "step": s,
                          **{t: min(100.0, s + rng.uniform(0, 10)) for t in TASKS},
                          "average_seen": 40.0, "average_held_out": 20.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    test = {t: float(rng.uniform(20, 80)) for t in TASKS}
    (run / "summary.json").write_text(json.dumps({
        "test": {**test, "average_seen": 50.0, "average_held_out": 30.0},
        "metrics": TASKS, "held_out": [held] if held else []}))


def _fake_ablation(out: Path, methods=("static", "uncertainty"), seeds=(0, 1), **kw):
    runs = []
    for method in methods:
        for seed in seeds:
            _fake_run(out / "runs" / f"{method}-{seed}", seed, method, **kw)
            runs.append((f"weighting.method={method}", out / "runs" / f"{method}-{seed}", method))
    return runs


def test_every_figure_is_a_png_of_paper_width(tmp_path):
    paths = plots.write_figures(tmp_path, _fake_ablation(tmp_path))
    assert set(paths) == {"bars", "validation", "losses", "weighted_losses"}
    assert [p.name for p in paths.values()] == ["metrics.png", "validation_curves.png",
                                                "training_losses.png", "weighted_losses.png"]
    for path in paths.values():
        width, height = _png_size(path)
        # 6.5 in at 150 dpi = 975 px; tight cropping trims or widens a little, never much
        assert 850 <= width <= 1100 and 250 <= height <= 1400, (path.name, width, height)
    # two rows of panels (four tasks + two averages) are taller than one row of bars
    assert _png_size(paths["validation"])[1] > _png_size(paths["bars"])[1]


def test_static_weights_only_draw_no_weighted_figure_and_remove_a_stale_one(tmp_path):
    stale = tmp_path / "weighted_losses.png"
    stale.write_bytes(b"old")
    paths = plots.write_figures(tmp_path, _fake_ablation(tmp_path, methods=("static",)))
    assert "weighted_losses" not in paths and not stale.exists()
    assert paths["losses"].read_bytes()[:8] == PNG


def test_runs_without_validation_or_task_losses_draw_only_the_bars(tmp_path):
    runs = _fake_ablation(tmp_path, validation=False, seeds=(0,))
    for _, run, _ in runs:       # older runs logged the summed loss only
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"event": "train", "step": r["step"], "loss": 1.0}) + "\n" for r in lines))
    paths = plots.write_figures(tmp_path, runs)
    assert list(paths) == ["bars"] and _png_size(paths["bars"])[0] > 850


def test_metric_groups_put_each_metric_kind_and_the_averages_apart(tmp_path):
    settings = {"s": {"runs": [plots.read_run(r) for _, r, _ in _fake_ablation(
        tmp_path, methods=("static",), seeds=(0,))], "method": "static"}}
    present = set(settings["s"]["runs"][0].summary["test"])
    groups = plots.metric_groups(settings, list(TASKS), present)
    assert groups == {"exact match": ["copy", "reverse"], "accuracy": ["parity"], "f1": ["qa"],
                      "averages": ["average_seen", "average_held_out"]}
    assert plots._held_out(settings) == {"qa"}
    # panels in the config's order (the validation records'), not the first step's batch's
    assert plots._tasks(settings, "loss") == ["copy", "reverse", "parity"]
    assert plots._tasks(settings, "validation") == list(TASKS)
    # the legacy "average" only where the runs predate average_seen
    assert plots.metric_groups(settings, ["copy"], {"copy", "average"})["averages"] == ["average"]


def test_write_reports_returns_the_new_figures(tmp_path):
    runs = []
    for method in ("static", "uncertainty"):
        _fake_run(tmp_path / "runs" / f"m-{method}", 0, method, steps=20, held=None)
        runs.append((f"m-{method}", {"weighting.method": method}, 0, None))
    paths = write_reports(tmp_path, runs)
    # without a config the method is unknown: the weighted figure still says it weighs
    for key in ("bars", "validation", "losses", "weighted_losses"):
        assert paths[key].read_bytes()[:8] == PNG, key
    assert "curves" not in paths and not (tmp_path / "training_curves.png").exists()
