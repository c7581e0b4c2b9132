"""Ablation reports from the runs' outputs: ``results.csv`` read back and summarised per setting
and task (:func:`aggregate`), the footnotes' facts from the runs' ``summary.json``
(:func:`run_notes`, :func:`evaluation_notes`), the prompt-robustness table
``table_templates.md`` (:func:`template_table`) and the training curves (:func:`read_curve`).

The rest of the report lives beside it: the ablation table ``table.md`` / ``table.csv`` /
``table.tex`` with its confidence intervals, Δm and significance marks in
:mod:`polytask.experiments.table` (the statistics themselves in
:mod:`polytask.experiments.stats`), the figures in :mod:`polytask.experiments.plots`, and the
gradient-conflict CSV and heatmap in :mod:`polytask.experiments.conflicts`.

Averages: ``average_seen`` (trained tasks) and ``average_held_out`` (held-out tasks, scored
zero-shot) are separate columns; results without them (older runs) show ``average``. Held-out
task columns are marked ``†``; :func:`run_notes` reads the held-out tasks and the number of test
examples scored per task from the summaries, and few-shot runs (``data.eval_shots``) can add a
footnote with the demonstrations used (:func:`evaluation_notes`).
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

AVERAGE = "average"                               # legacy: runs without held-out tasks
#: a continual run's GEM metrics (experiments.continual), columns after the averages
CONTINUAL = ("continual/average", "continual/backward_transfer", "continual/forward_transfer")
AVERAGES = ("average_seen", "average_held_out", AVERAGE) + CONTINUAL
HELD_OUT_MARK = "†"


def read_results(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
    """``average_seen`` and ``average_held_out`` where present; else the legacy ``average``;
    then a continual run's average accuracy, backward and forward transfer where present."""
    extra = [c for c in CONTINUAL if c in present]
    if "average_seen" in present:
        return [a for a in AVERAGES[:2] if a in present] + extra
    return [AVERAGE] + extra


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
        for task, scored in summary.get("templates", {}).items():
            if len(scored.get("per_template", [])) > 1:
                spread[combo, task].append(scored)
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
