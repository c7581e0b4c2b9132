"""The ablation's gradient-conflict report: ``gradient_conflicts.csv`` (every logged cosine) and
``gradient_conflicts.png`` (per setting, the mean cosine matrix of the second half of training):
:func:`write_conflicts`.

Each evaluation of a run that shares parameters between two or more tasks logs an event
``{"event": "gradients", "step", "tasks", "cosine": k x k, "conflict_fraction", ...}``
(experiments.task_gradients.gradient_conflicts). ``tasks`` follows the step's last micro-batch,
so a task can be missing from some events: everything here aligns tasks by name.
"""
from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path
from statistics import mean, stdev
from typing import Any

CONFLICT_FIELDS = ["setting", "seed", "run", "step", "second_half", "task_a", "task_b", "cosine",
                   "conflict_fraction"]


def read_gradients(metrics_path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(the run's gradient events by step, its last training step). A resumed run re-logs the
    steps after its checkpoint: the last record of a step wins."""
    path = Path(metrics_path)
    events: dict[int, dict[str, Any]] = {}
    last = 0
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        rec: dict[str, Any] = json.loads(line)
        if rec.get("event") == "train":
            last = max(last, int(rec["step"]))
        elif rec.get("event") == "gradients":
            k, cos = len(rec["tasks"]), rec["cosine"]
            if len(cos) != k or any(len(row) != k for row in cos):
                raise ValueError(f"{path}:{n}: gradients event at step {rec['step']} has a "
                                 f"cosine matrix of {len(cos)} rows for {k} tasks; expected "
                                 f"{k} x {k}")
            events[int(rec["step"])] = rec
    steps = sorted(events)
    return [events[s] for s in steps], max([last] + steps)


def second_half(events: list[dict[str, Any]], last_step: int) -> list[dict[str, Any]]:
    """The events of the second half of training: step > last_step / 2 (the figure leaves out
    the start, so it shows the regime the runs settled into rather than the transient)."""
    return [e for e in events if 2 * int(e["step"]) > last_step]


def mean_cosines(events: list[dict[str, Any]]) -> tuple[list[str], Any, Any]:
    """(tasks in order of first appearance, mean cosine ``(k, k)``, events counted ``(k, k)``):
    each pair averaged over the events where both of its tasks are present, every event
    weighing the same; NaN where a pair never met."""
    import numpy as np

    tasks: list[str] = []
    for e in events:
        tasks += [t for t in e["tasks"] if t not in tasks]
    total = np.zeros((len(tasks), len(tasks)))
    count = np.zeros((len(tasks), len(tasks)), dtype=int)
    for e in events:
        at = [tasks.index(t) for t in e["tasks"]]
        total[np.ix_(at, at)] += np.asarray(e["cosine"], dtype=float)
        count[np.ix_(at, at)] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return tasks, np.where(count > 0, total / count, np.nan), count


def conflict_rows(setting: str, seed: int, run: str, events: list[dict[str, Any]],
                  last_step: int) -> list[dict[str, Any]]:
    """``gradient_conflicts.csv``'s rows: one per task pair (a < b in the event's order) per
    event, with the event's conflict fraction and whether the figure averages it."""
    rows = []
    for e in events:
        tasks, cos = e["tasks"], e["cosine"]
        for a in range(len(tasks)):
            rows += [{"setting": setting, "seed": seed, "run": run, "step": e["step"],
                      "second_half": int(2 * int(e["step"]) > last_step),
                      "task_a": tasks[a], "task_b": tasks[b], "cosine": cos[a][b],
                      "conflict_fraction": e["conflict_fraction"]}
                     for b in range(a + 1, len(tasks))]
    return rows


def write_conflicts(runs: dict[str, list[tuple[int, str, list[dict[str, Any]], int]]],
                    out: str | Path) -> dict[str, Path]:
    """``gradient_conflicts.csv`` and ``.png`` in ``out`` from ``{setting: [(seed, run name,
    events, last step)]}``; returns the files written. Without any event neither is written,
    and stale copies from an earlier grid are removed so the directory never shows them."""
    out = Path(out)
    paths = {"conflicts_csv": out / "gradient_conflicts.csv",
             "conflicts": out / "gradient_conflicts.png"}
    rows = [r for label, rs in runs.items() for seed, name, events, last in rs
            for r in conflict_rows(label, seed, name, events, last)]
    late = {label: [second_half(ev, last) for _, _, ev, last in rs if ev]
            for label, rs in runs.items() if any(ev for _, _, ev, _ in rs)}
    drawn = any(e for per_run in late.values() for e in per_run)
    if rows:
        with open(paths["conflicts_csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CONFLICT_FIELDS)
            w.writeheader()
            w.writerows(rows)
    if drawn:
        plot_conflicts(late, paths["conflicts"], [label for label in runs if label not in late])
    for key, wrote in (("conflicts_csv", bool(rows)), ("conflicts", drawn)):
        if not wrote:
            paths.pop(key).unlink(missing_ok=True)
    return paths


def plot_conflicts(settings: dict[str, list[list[dict[str, Any]]]], path: str | Path,
                   without: list[str] | None = None) -> None:
    """One heatmap per setting of :func:`mean_cosines` over its runs' events (``settings`` maps
    a setting to one list of events per run, already cut to the second half); the title gives
    the conflict fraction as mean ± std over runs (each run's mean over its events), ``without``
    the settings that logged nothing, named in the caption."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(settings)
    k_max = max(len({t for r in rs for e in r for t in e["tasks"]}) for rs in settings.values())
    side = max(2.8, 0.8 * k_max + 1.2)                      # inches per panel
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * side + 1.2, rows * (side + 1.0) + 0.8),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("RdBu").with_extremes(bad="0.85")   # red = conflict (cosine < 0)
    image = None
    for ax, label in zip(axes.flat, labels):
        per_run = [r for r in settings[label] if r]
        ax.set_title(_conflict_title(label, per_run), fontsize=10)
        if not per_run:
            ax.text(0.5, 0.5, "no evaluation in the\nsecond half", ha="center", va="center")
            ax.set_axis_off()
            continue
        tasks, cos, count = mean_cosines([e for r in per_run for e in r])
        image = ax.imshow(np.ma.masked_invalid(cos), cmap=cmap, vmin=-1, vmax=1)
        ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right", fontsize=10)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=10)
        n_events = sum(len(r) for r in per_run)
        for (i, j), c in np.ndenumerate(cos):
            text = "–" if np.isnan(c) else f"{c:.2f}"
            if 0 < count[i, j] < n_events:                  # a pair that met in fewer events
                text += f"\n({count[i, j]}/{n_events})"
            ax.text(j, i, text, ha="center", va="center", fontsize=10 if len(tasks) < 7 else 8,
                    color="white" if abs(c) > 0.6 else "black")
    for ax in axes.flat[len(labels):]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity (< 0: conflict)")
    caption = ("Per-task gradient cosine on the shared parameters (last micro-batch of each "
               "evaluation step), mean over the evaluations in the second half of training "
               "(step > last step / 2) and over seeds; (m/n): pair present in m of n evaluations.")
    if without:
        caption += " No diagnostics (nothing shared or one task): " + "; ".join(without) + "."
    fig.suptitle("\n".join(textwrap.wrap(caption, int(14 * (cols * side + 1.2)))), fontsize=9)
    fig.savefig(path, dpi=150, bbox_inches="tight")   # long labels: keep every text inside
    plt.close(fig)


def _stats(values: list[float]) -> tuple[float, float]:
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def _conflict_title(label: str, per_run: list[list[dict[str, Any]]]) -> str:
    """The setting (wrapped) and its conflict fraction: mean ± std over runs, n runs."""
    title = "\n".join(textwrap.wrap(label, 38))
    if not per_run:
        return title
    m, s = _stats([mean(float(e["conflict_fraction"]) for e in r) for r in per_run])
    return f"{title}\nconflicting pairs {m:.2f} ± {s:.2f} (n={len(per_run)} runs)"
