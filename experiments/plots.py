"""Ablation figures sized for a paper (6.5 in wide, 8 pt text, 150 dpi), from the run directories.

:func:`write_figures` draws, for an ablation's settings (one line or bar per setting, the seeds
of a setting pooled):

- ``validation_curves.png``: per task, the validation metric over steps (the mean over seeds,
  shaded min–max over seeds); held-out tasks marked ``†``;
- ``training_losses.png``: per task, the training loss before weighting, smoothed per run by a
  trailing moving average (:func:`smoothing_window` logged steps), mean and min–max over seeds;
- ``weighted_losses.png``: the same, each loss times the weight the weighting method gave it that
  step (``weight/<task>``); only when some run logged a weight other than 1;
- ``metrics.png``: the test scores as bars, one panel per metric kind (accuracy, exact match ...),
  held-out tasks hatched, the averages in a panel of their own; error bars are the 95% confidence
  interval of the mean over seeds from Student's t distribution, as ``table.md`` gives it
  (:func:`polytask.experiments.stats.mean_ci`).

Each caption says what the lines, bands and bars are. A figure without data (runs that logged no
validation or no per-task losses) is not drawn, and a stale copy of it is removed.
"""
from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polytask.experiments import stats
from polytask.experiments.report import AVERAGES, HELD_OUT_MARK

WIDTH = 6.5                        # inches: a paper's text width
DPI = 150
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.titlesize": 9}
TINY_WEIGHT = 1e-6                 # |weight - 1| above this: the weighting did weigh


@dataclass
class RunLog:
    """One run's logged series: ``{task: [(step, value)]}`` per kind, and its summary."""
    loss: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    weight: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    validation: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def read_run(run_dir: str | Path) -> RunLog:
    """``metrics.jsonl`` and ``summary.json`` of a run. A resumed run re-logs the steps after its
    checkpoint: the last record of a step wins. A step's batch can miss a task, so each task has
    its own steps."""
    run_dir = Path(run_dir)
    series: dict[str, dict[str, dict[int, float]]] = {k: defaultdict(dict) for k in
                                                      ("loss", "weight", "validation")}
    path = run_dir / "metrics.jsonl"
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            rec: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON record ({err})") from None
        step = int(rec.get("step", 0))
        if rec.get("event") == "train":
            for key, value in rec.items():
                kind, _, task = key.partition("/")
                if task and kind in ("loss", "weight"):
                    series[kind][task][step] = float(value)
        elif rec.get("event") == "eval" and rec.get("split") == "validation":
            for key, value in rec.items():
                if key not in ("event", "split", "step") and isinstance(value, (int, float)):
                    series["validation"][key][step] = float(value)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return RunLog(**{k: {t: sorted(v.items()) for t, v in s.items()} for k, s in series.items()},
                  summary=summary)


# --- the pure pieces: smoothing, the band over seeds --------------------------------------

def smoothing_window(n_steps: int) -> int:
    """The moving average's window: a twentieth of the logged steps (1, no smoothing, below 40)."""
    return max(1, n_steps // 20)


def smooth(values: list[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average: point i is the mean of values ``i - window + 1 .. i`` (fewer at
    the start, so the curve begins at the first value rather than being pulled to 0)."""
    x = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"smoothing window must be at least 1, got {window}")
    total = np.cumsum(np.concatenate([[0.0], x]))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (total[i] - total[lo]) / (i - lo)


def band(curves: list[list[tuple[int, float]]]) -> dict[str, np.ndarray]:
    """Mean, min and max over seeds at every step any curve logged: each curve is interpolated
    linearly between its own steps and counts only inside its own range (a run that stopped
    early leaves the band there; ``n`` says how many curves each point pools)."""
    curves = [c for c in curves if c]
    steps = np.array(sorted({s for c in curves for s, _ in c}), dtype=float)
    grid = np.full((len(curves), len(steps)), np.nan)
    for k, c in enumerate(curves):
        xs, ys = np.array(c, dtype=float).T
        inside = (steps >= xs[0]) & (steps <= xs[-1])
        grid[k, inside] = np.interp(steps[inside], xs, ys)
    with np.errstate(all="ignore"):
        return {"step": steps, "mean": np.nanmean(grid, 0), "min": np.nanmin(grid, 0),
                "max": np.nanmax(grid, 0), "n": np.sum(~np.isnan(grid), 0)}


# --- figures ----------------------------------------------------------------------------------

Setting = dict[str, Any]    # {"runs": [RunLog], "method": weighting method}


def write_figures(out: str | Path, runs: list[tuple[str, Path, str]]) -> dict[str, Path]:
    """The figures of the module doc in ``out`` from ``[(setting label, run directory, weighting
    method)]``; returns the files written (a figure without data is not, and its stale copy
    is removed)."""
    out = Path(out)
    settings: dict[str, Setting] = {}
    for label, run_dir, method in runs:
        s = settings.setdefault(label, {"runs": [], "method": method})
        s["runs"].append(read_run(run_dir))
    paths = {"bars": out / "metrics.png", "validation": out / "validation_curves.png",
             "losses": out / "training_losses.png", "weighted_losses": out / "weighted_losses.png"}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        drawn = {"bars": plot_metrics(settings, paths["bars"]),
                 "validation": plot_validation(settings, paths["validation"]),
                 "losses": plot_losses(settings, paths["losses"], weighted=False),
                 "weighted_losses": plot_losses(settings, paths["weighted_losses"], weighted=True)}
    for key, wrote in drawn.items():
        if not wrote:
            paths.pop(key).unlink(missing_ok=True)
    return paths


def _tasks(settings: dict[str, Setting], kind: str) -> list[str]:
    """The tasks ``kind`` logged, in run order: as the validation records list them (the
    config's order; a step's losses start with whichever tasks its batch held), then any
    others by first appearance; without the averages."""
    seen: list[str] = []
    for k in ("validation", kind):
        for s in settings.values():
            for r in s["runs"]:
                seen += [t for t in getattr(r, k) if t not in seen]
    logged = {t for s in settings.values() for r in s["runs"] for t in getattr(r, kind)}
    return [t for t in seen if t in logged and t not in AVERAGES]


def _held_out(settings: dict[str, Setting]) -> set[str]:
    return {t for s in settings.values() for r in s["runs"] for t in r.summary.get("held_out", [])}


def _metric(settings: dict[str, Setting], task: str) -> str:
    for s in settings.values():
        for r in s["runs"]:
            if task in r.summary.get("metrics", {}):
                return r.summary["metrics"][task].replace("_", " ")
    return "metric"


def _averages(present: set[str]) -> list[str]:
    if "average_seen" in present:
        return [a for a in AVERAGES[:2] if a in present]
    return [a for a in AVERAGES[2:] if a in present]


def _task_title(task: str, held: set[str]) -> str:
    return f"{task}{HELD_OUT_MARK} (held out)" if task in held else task


def _average_title(name: str) -> str:
    return {"average_seen": "average (trained tasks)", "average_held_out":
            f"average (held-out tasks{HELD_OUT_MARK})"}.get(name, "average")


AVERAGE_TICKS = {"average_seen": "trained\ntasks", "average_held_out":
                 f"held-out\ntasks{HELD_OUT_MARK}", "average": "all\ntasks"}


def _held_note(held: set[str]) -> str:
    return (f" {HELD_OUT_MARK} held out ({', '.join(sorted(held))}): never trained, scored "
            "zero-shot, never selects checkpoints." if held else "")


def _colors(settings: dict[str, Setting]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cycle = plt.get_cmap("tab10")
    return {label: cycle(i % 10) for i, label in enumerate(settings)}


def _dashes(settings: dict[str, Setting]) -> dict[str, str]:
    """A line style per setting too: lines that coincide stay visible, and print in grey."""
    return {label: ("-", "--", ":", "-.")[i % 4] for i, label in enumerate(settings)}


def _panels(n: int, height: float = 1.7):
    """``n`` panels, three per row; a panel with none below it shows the step axis."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, rows * height + 0.4), squeeze=False,
                             sharex=True, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for i, ax in enumerate(axes.flat[:n]):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))   # whole steps, few ticks
        if i + cols >= n:
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("step")
    return fig, list(axes.flat[:n])


def _flat_limits(ax) -> None:
    """A flat metric (all 0, say) gets a range of 10 around it, not matplotlib's 5%."""
    if ax.dataLim.height < 1e-9:
        bottom = max(-0.5, ax.dataLim.y0 - 5)
        ax.set_ylim(bottom, bottom + 10)


def _finish(fig, handles, labels, caption: str, path: Path, title: str | None = None) -> None:
    """The title and the shared legend (one box) above the panels and the wrapped caption under
    them, all placed by the constrained layout (a suptitle would overlap an outside legend);
    ``bbox_inches="tight"`` keeps every label inside the image."""
    import matplotlib.pyplot as plt

    labels = ["\n".join(textwrap.wrap(lab, 45)) for lab in labels]
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 3),
               frameon=False, title=title, title_fontproperties={"size": 9})
    fig.supxlabel("\n".join(textwrap.wrap(caption, 125)), fontsize=7)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _seeds(settings: dict[str, Setting]) -> str:
    """``n=3 seeds`` (``n=2-3 seeds`` where settings differ); no spaces, so never wrapped."""
    n = sorted({len(s["runs"]) for s in settings.values()})
    count = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
    return f"n={count} seed{'s' if n[-1] > 1 else ''}"


def plot_validation(settings: dict[str, Setting], path: Path) -> bool:
    tasks = _tasks(settings, "validation")
    if not tasks:
        return False
    present = {t for s in settings.values() for r in s["runs"] for t in r.validation}
    panels = tasks + _averages(present)
    held, colors, dashes = _held_out(settings), _colors(settings), _dashes(settings)
    fig, axes = _panels(len(panels))
    lines = {}
    for ax, task in zip(axes, panels):
        for label, s in settings.items():
            curves = [r.validation.get(task, []) for r in s["runs"]]
            if any(curves):
                b = band(curves)
                lines[label], = ax.plot(b["step"], b["mean"], color=colors[label], lw=1.2,
                                        ls=dashes[label], marker="o", ms=2)
                ax.fill_between(b["step"], b["min"], b["max"], color=colors[label], alpha=0.2,
                                lw=0)
        ax.set_title(_task_title(task, held) if task not in AVERAGES else _average_title(task))
        ax.set_ylabel(_metric(settings, task) if task not in AVERAGES else "mean of task metrics")
        _flat_limits(ax)
        if task in held or task == "average_held_out":
            ax.set_facecolor("0.95")
    _finish(fig, list(lines.values()), list(lines), "Validation metric per task over training "
            f"steps: line = mean over seeds ({_seeds(settings)} per setting), shaded band = "
            "min–max over seeds." + _held_note(held)
            + (" Grey panels: held-out tasks." if held else ""), path)
    return True


def _weighted(run: RunLog, task: str) -> list[tuple[int, float]]:
    """loss x the weight logged at the same step (steps without a weight are left out)."""
    weights = dict(run.weight.get(task, []))
    return [(s, v * weights[s]) for s, v in run.loss.get(task, []) if s in weights]


def _weighs(run: RunLog) -> bool:
    return any(abs(w - 1) > TINY_WEIGHT for c in run.weight.values() for _, w in c)


def plot_losses(settings: dict[str, Setting], path: Path, weighted: bool) -> bool:
    tasks = _tasks(settings, "loss")
    methods = sorted({s["method"] or "the weighting" for s in settings.values()
                      if any(_weighs(r) for r in s["runs"])})
    if not tasks or (weighted and not methods):
        return False
    steps = max(len(c) for s in settings.values() for r in s["runs"] for c in r.loss.values())
    window = smoothing_window(steps)
    held, colors, dashes = _held_out(settings), _colors(settings), _dashes(settings)
    fig, axes = _panels(len(tasks))
    lines = {}
    for ax, task in zip(axes, tasks):
        for label, s in settings.items():
            curves = []
            for r in s["runs"]:
                c = _weighted(r, task) if weighted else r.loss.get(task, [])
                if c:
                    curves.append(list(zip([st for st, _ in c], smooth([v for _, v in c], window))))
            if curves:
                b = band(curves)
                lines[label], = ax.plot(b["step"], b["mean"], color=colors[label], lw=1.0,
                                        ls=dashes[label])
                ax.fill_between(b["step"], b["min"], b["max"], color=colors[label], alpha=0.2,
                                lw=0)
        ax.set_title(_task_title(task, held))
        ax.set_ylabel("loss × weight" if weighted else "loss (unweighted)")
    what = (f"weighted by {', '.join(methods)}: each task's loss times the weight the method "
            "gave it that step (weight/<task> in metrics.jsonl; static settings weigh 1)"
            if weighted else "before weighting (the raw task loss)")
    smoothing = (f"trailing moving average over {window} logged steps per run"
                 if window > 1 else "not smoothed (under 40 logged steps)")
    _finish(fig, list(lines.values()), list(lines), f"Per-task training loss {what}; "
            f"{smoothing}; line = mean over seeds ({_seeds(settings)} per setting), shaded band "
            "= min–max over seeds.", path,
            title=f"Training losses weighted by {', '.join(methods)}" if weighted else None)
    return True


def metric_groups(settings: dict[str, Setting], tasks: list[str], present: set[str]
                  ) -> dict[str, list[str]]:
    """``{metric kind: tasks}`` in run order, one panel each, then ``averages`` (the averages
    present, :func:`_averages`): bars of different scales never share an axis label."""
    groups: dict[str, list[str]] = defaultdict(list)
    for t in tasks:
        groups[_metric(settings, t)].append(t)
    if _averages(present):
        groups["averages"] = _averages(present)
    return dict(groups)


def plot_metrics(settings: dict[str, Setting], path: Path) -> bool:
    tests = {label: [r.summary.get("test", {}) for r in s["runs"]]
             for label, s in settings.items()}
    present = {t for ts in tests.values() for test in ts for t in test}
    tasks = [t for t in dict.fromkeys(t for ts in tests.values() for test in ts for t in test)
             if t not in AVERAGES]
    if not present:
        return False
    held, groups = _held_out(settings), metric_groups(settings, tasks, present)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = _colors(settings)
    fig, axes = plt.subplots(1, len(groups), figsize=(WIDTH, 2.6), squeeze=False,
                             layout="constrained",
                             width_ratios=[len(ts) + 0.5 for ts in groups.values()])
    width = 0.8 / len(settings)
    for ax, (kind, group) in zip(axes[0], groups.items()):
        low, high = 0.0, 100.0
        for k, (label, ts) in enumerate(tests.items()):
            for x, task in enumerate(group):
                values = [test[task] for test in ts if task in test]
                if not values:
                    continue
                m, h = stats.mean_ci(values)   # as table.md: t interval, None for one seed
                hatch = "///" if task in held or task == "average_held_out" else None
                ax.bar(x - 0.4 + (k + 0.5) * width, m, width, color=colors[label], hatch=hatch,
                       edgecolor="white", lw=0)
                if h is not None:
                    low, high = min(low, m - h), max(high, m + h)
                    ax.errorbar(x - 0.4 + (k + 0.5) * width, m, yerr=h, color="black",
                                lw=0.8, capsize=2)
        names = [_task_title(t, held).replace(" (held out)", "\n(held out)")
                 if t not in AVERAGES else AVERAGE_TICKS[t]
                 for t in group]
        ax.set_xticks(range(len(group)), names, rotation=30 if len(group) > 2 else 0,
                      ha="right" if len(group) > 2 else "center")
        ax.set_title(kind)
        ax.set_ylabel("mean of task metrics" if kind == "averages" else kind)
        ax.set_ylim(min(0.0, low), max(100.0, high) + 5)   # whiskers past 0-100 stay visible
    _finish(fig, [Patch(color=colors[label]) for label in tests], list(tests),
            f"Bars: mean over seeds; error bars: {stats.LEVEL:.0%} confidence interval of the "
            "mean (Student's t, n-1 degrees of freedom; none where n=1); scores 0-100 on the "
            "test split."
            + (" Hatched: held-out tasks and their average." + _held_note(held) if held else ""),
            path,
            title=f"Test metrics per setting ({_seeds(settings)})")
    return True
