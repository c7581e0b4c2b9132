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
"""
from __future__ import annotations

import csv
import json
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
