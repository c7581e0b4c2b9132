"""Ablation reports: ``results.csv`` -> ``table.md`` and PNG plots.

The table has one row per grid combination and one column per task plus the average. Each cell
is the mean ± standard deviation over seeds (sample std, ``ddof=1``; 0 for one seed), then the
difference Δ of the mean against the single-task baseline (the combination with
``sharing.strategy = none`` and otherwise the same settings, when the grid has one). The best
mean of each column is bold.

Averages: ``average_seen`` (trained tasks) and ``average_held_out`` (held-out tasks, scored
zero-shot) are separate columns; results without them (older runs) show ``average``. Held-out
task columns are marked ``†`` and explained in a footnote, as is the number of test examples
scored per task (:func:`run_notes` reads both from the runs' ``summary.json``); few-shot runs
(``data.eval_shots``) can add a footnote with the demonstrations used (:func:`evaluation_notes`).

Runs that logged gradient-conflict diagnostics add ``gradient_conflicts.csv`` (every logged
cosine) and ``gradient_conflicts.png`` (per setting, the mean cosine matrix of the second half of
training): :func:`write_conflicts`.
"""
from __future__ import annotations

import csv
import json
import textwrap
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Any

AVERAGE = "average"                               # legacy: runs without held-out tasks
AVERAGES = ("average_seen", "average_held_out", AVERAGE)
HELD_OUT_MARK = "†"


def read_results(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _stats(values: list[float]) -> tuple[float, float]:
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict[str, str]]) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]]]:
    """-> (combination labels in order, task columns, {(combination, task): [value per seed]})."""
    combos: list[str] = []
    tasks: list[str] = []
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["combination"] not in combos:
            combos.append(r["combination"])
        if r["task"] not in tasks and r["task"] not in AVERAGES:
            tasks.append(r["task"])
        cells[(r["combination"], r["task"])].append(float(r["value"]))
    return combos, tasks + average_columns({r["task"] for r in rows}), cells


def average_columns(present: set[str]) -> list[str]:
    """``average_seen`` and ``average_held_out`` where present; else the legacy ``average``."""
    if "average_seen" in present:
        return [a for a in AVERAGES[:2] if a in present]
    return [AVERAGE]


def run_notes(summaries: list[dict[str, Any]]) -> tuple[list[str], dict[str, int]]:
    """(held-out tasks, ``{task: test examples scored}``) over the runs' summaries (the
    smallest count where runs differ); summaries without the keys contribute nothing."""
    held: list[str] = []
    examples: dict[str, int] = {}
    for s in summaries:
        held += [t for t in s.get("held_out", []) if t not in held]
        for t, n in s.get("examples", {}).get("test", {}).items():
            examples[t] = min(n, examples.get(t, n))
    return held, examples


def evaluation_notes(summaries: list[dict[str, Any]]) -> list[str]:
    """Footnotes on how the test was scored: few-shot runs (``data.eval_shots``) with the mean
    demonstrations used per task (the length budget drops some), averaged over those runs;
    summaries without ``shots`` (older runs) or with 0 contribute nothing."""
    used: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        if s.get("shots", 0) > 0:
            for t, n in s.get("demonstrations", {}).items():
                used[s["shots"]][t].append(n)
    return [f"{k}-shot test (demonstrations from each task's train split; checkpoints chosen "
            "zero-shot), mean demonstrations used: "
            + ", ".join(f"{t} {mean(v):.1f}" for t, v in used[k].items()) + "."
            for k in sorted(used)]


def template_table(runs: list[tuple[str, dict[str, Any]]]) -> str | None:
    """Robustness across prompt wordings (T0's measure): per combination and task, the mean over
    seeds of the template mean, and of its min and max, as ``mean [min, max]``; ``runs`` are
    (combination, summary) pairs. None when no run scored more than one template
    (``data.eval_templates: all``)."""
    spread: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    combos: list[str] = []
    tasks: list[str] = []
    for combo, summary in runs:
        for task, stats in summary.get("templates", {}).items():
            if len(stats.get("per_template", [])) > 1:
                spread[combo, task].append(stats)
                combos += [combo] if combo not in combos else []
                tasks += [task] if task not in tasks else []
    if not spread:
        return None
    lines = ["| setting | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for combo in combos:
        cells = []
        for task in tasks:
            s = spread.get((combo, task))
            cells.append("-" if not s else "{:.1f} [{:.1f}, {:.1f}]".format(
                *(mean(x[k] for x in s) for k in ("mean", "min", "max"))))
        lines.append(f"| {combo} | " + " | ".join(cells) + " |")
    lines += ["", "Per task: the mean over its templates, and the lowest and highest template "
              "score, each averaged over seeds (test split)."]
    return "\n".join(lines) + "\n"


def baseline_of(combo: str) -> str | None:
    """The single-task combination matching ``combo`` in every other grid key."""
    parts = dict(p.split("=", 1) for p in combo.split(", ") if "=" in p)
    if "sharing.strategy" not in parts:
        return None
    parts["sharing.strategy"] = "none"
    return ", ".join(f"{k}={v}" for k, v in parts.items())


def _column_name(t: str, metric_names: dict[str, str], held_out: set[str]) -> str:
    name = f"{t}{HELD_OUT_MARK}" if t in held_out else t
    return f"{name} ({metric_names[t]})" if t in metric_names else name


def markdown_table(rows: list[dict[str, str]], metric_names: dict[str, str] | None = None,
                   held_out: list[str] | None = None,
                   examples: dict[str, int] | None = None,
                   notes: list[str] | None = None) -> str:
    """The table (module doc); ``held_out`` and ``examples`` as :func:`run_notes` gives them,
    ``notes`` (e.g. :func:`evaluation_notes`) appended as footnotes."""
    combos, tasks, cells = aggregate(rows)
    metric_names = metric_names or {}
    held = set(held_out or [])
    best = {}
    for t in tasks:
        means = [_stats(cells[(c, t)])[0] for c in combos if cells.get((c, t))]
        best[t] = max(means) if means else None
    header = ["setting"] + [_column_name(t, metric_names, held) for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in combos:
        base = baseline_of(c)
        out = [c]
        for t in tasks:
            vals = cells.get((c, t))
            if not vals:
                out.append("–")
                continue
            m, s = _stats(vals)
            text = f"{m:.1f} ± {s:.1f}"
            if base is not None and base != c and cells.get((base, t)):
                text += f" (Δ {m - _stats(cells[(base, t)])[0]:+.1f})"
            if best[t] is not None and abs(m - best[t]) < 1e-9:
                text = f"**{text}**"
            out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    n_seeds = max((len(v) for v in cells.values()), default=0)
    lines.append("")
    lines.append(f"Mean ± std over {n_seeds} seed(s) on the test split; Δ against the single-task "
                 "baseline (sharing.strategy=none) with the same other settings; best mean in bold.")
    lines += _footnotes([t for t in tasks if t in held], examples or {}) + list(notes or [])
    return "\n".join(lines) + "\n"


def _footnotes(held: list[str], examples: dict[str, int]) -> list[str]:
    out = []
    if held:
        out.append(f"{HELD_OUT_MARK} held out ({', '.join(held)}): never trained, scored zero-shot; "
                   "in average_held_out only, never in average_seen or checkpoint selection.")
    if examples:
        out.append("Test examples scored per task: "
                   + ", ".join(f"{t} {n}" for t, n in examples.items()) + ".")
    return out


def plot_bars(rows: list[dict[str, str]], path: str | Path) -> None:
    """Grouped bars: per task (x), one bar per combination, error bars = std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    combos, tasks, cells = aggregate(rows)
    x = np.arange(len(tasks))
    width = 0.8 / max(1, len(combos))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(combos)) / 2), 4))
    for k, c in enumerate(combos):
        stats = [_stats(cells[(c, t)]) if cells.get((c, t)) else (0.0, 0.0) for t in tasks]
        ax.bar(x + k * width - 0.4 + width / 2, [m for m, _ in stats], width,
               yerr=[s for _, s in stats], capsize=2, label=c)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("test metric (0-100)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: str | Path,
                ylabel: str = "training loss") -> None:
    """One line per combination: the mean over seeds of (step, value) curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for combo, runs in curves.items():
        by_step: dict[int, list[float]] = defaultdict(list)
        for run in runs:
            for step, value in run:
                by_step[step].append(value)
        steps = sorted(by_step)
        ax.plot(steps, [mean(by_step[s]) for s in steps], label=combo)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_curve(metrics_path: str | Path, key: str = "loss") -> list[tuple[int, float]]:
    out = []
    path = Path(metrics_path)
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        rec: dict[str, Any] = json.loads(line)
        if rec.get("event") == "train" and key in rec:
            out.append((int(rec["step"]), float(rec[key])))
    return out


# --- gradient conflicts -----------------------------------------------------------------------
# Each evaluation of a run that shares parameters between two or more tasks logs an event
# ``{"event": "gradients", "step", "tasks", "cosine": k x k, "conflict_fraction", ...}``
# (experiments.train.gradient_conflicts). ``tasks`` follows the step's last micro-batch, so a
# task can be missing from some events: everything here aligns tasks by name.

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


def _conflict_title(label: str, per_run: list[list[dict[str, Any]]]) -> str:
    """The setting (wrapped) and its conflict fraction: mean ± std over runs, n runs."""
    title = "\n".join(textwrap.wrap(label, 38))
    if not per_run:
        return title
    m, s = _stats([mean(float(e["conflict_fraction"]) for e in r) for r in per_run])
    return f"{title}\nconflicting pairs {m:.2f} ± {s:.2f} (n={len(per_run)} runs)"
