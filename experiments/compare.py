"""``polytask compare DIR...``: one table from several ablations and single runs.

Each DIR is either
* a **run directory** (it holds ``summary.json``): one row, setting ``(run)``; or
* an **ablation directory** (it holds ``runs/*/summary.json``, as :func:`polytask.experiments.
  ablate.ablate` writes): one row per setting, the grid combination its ``results.csv`` names
  for each run (without ``results.csv``, e.g. an interrupted ablation, the run directory's name
  less its ``seed-N`` part), over the runs of that setting that finished.

Rows are (source, setting), columns the tasks of every source, in first-seen order, then the
averages (:func:`polytask.experiments.report.average_columns`). A cell is the mean of the test
scores over the row's runs ± the half-width of its 95% confidence interval
(:func:`polytask.experiments.stats.mean_ci`, Student's t; one run: its value alone); a task a
source did not score is "—". Runs whose ``summary.json`` says they did not finish training
(``"status": "non-finite"``) have no test scores: they are left out and counted in a footnote.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.core.training.manifest import atomic_write, read_json
from polytask.experiments import report
from polytask.experiments.stats import mean_ci

RUN_SETTING = "(run)"
MISSING = "—"
FORMATS = (".md", ".csv")
_SEED = re.compile(r"(^|_)seed-[^_]*$")   # the last part of ablate.run_name


@dataclass
class Source:
    """What one DIR holds: ``{setting: [test scores of each finished run]}`` in order."""

    label: str
    settings: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    skipped: int = 0   # runs without test scores (non-finite)


def read_summary(path: Path) -> dict[str, Any]:
    """A run's ``summary.json``, checked: an object whose ``test`` maps names to numbers (or a
    run that says it did not finish, ``"status"`` other than ``"ok"``)."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: holds a JSON {type(summary).__name__}, not a run summary")
    if summary.get("status", "ok") != "ok":
        return summary
    test = summary.get("test")
    if not isinstance(test, dict) or not all(isinstance(v, (int, float)) and
                                             not isinstance(v, bool) for v in test.values()):
        raise ValueError(f"{path}: 'test' must map task names to numbers, got {test!r:.80}")
    return summary


def ablation_setting(run_dir: Path, combinations: dict[str, str]) -> str:
    """The setting a run of an ablation belongs to (module doc)."""
    if run_dir.name in combinations:
        return combinations[run_dir.name]
    return _SEED.sub("", run_dir.name) or "base"


def load_source(path: str | Path) -> Source:
    """The runs of one DIR (module doc); a path that is neither kind is one ``ValueError``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}"
                         f"; polytask compare takes run directories (with summary.json) and "
                         f"ablation directories (with runs/*/summary.json)")
    source = Source(str(path))
    if (path / "summary.json").is_file():
        runs = [(RUN_SETTING, path / "summary.json")]
    else:
        found = sorted((path / "runs").glob("*/summary.json"))
        if not found:
            raise ValueError(f"{path}: neither a run directory (no summary.json) nor an "
                             f"ablation directory (no runs/*/summary.json)")
        results = path / "results.csv"
        combinations = ({r["run"]: r["combination"] for r in report.read_results(results)
                         if r.get("run") and r.get("combination")}
                        if results.is_file() else {})
        runs = [(ablation_setting(p.parent, combinations), p) for p in found]
    for setting, summary_path in runs:
        summary = read_summary(summary_path)
        if summary.get("status", "ok") != "ok":
            source.skipped += 1
            continue
        source.settings.setdefault(setting, []).append(dict(summary["test"]))
        source.metrics.update(summary.get("metrics") or {})
    return source


def columns(sources: Sequence[Source]) -> list[str]:
    """Every task scored by some source, in first-seen order, then the averages present."""
    names = [n for s in sources for runs in s.settings.values() for test in runs for n in test]
    tasks = list(dict.fromkeys(n for n in names if n not in report.AVERAGES))
    present = set(names) & set(report.AVERAGES)
    return tasks + [a for a in report.average_columns(present) if a in present]


def cell(values: list[float]) -> tuple[float, float | None] | None:
    """(mean, 95% CI half-width or None for one run) of a column's values; None without any."""
    return mean_ci(values) if values else None


def rows(sources: Sequence[Source], tasks: list[str]
         ) -> list[tuple[str, str, int, list[tuple[float, float | None] | None]]]:
    """(source, setting, runs, one :func:`cell` per task) for every row of the table."""
    out = []
    for s in sources:
        for setting, runs in s.settings.items():
            out.append((s.label, setting, len(runs),
                        [cell([r[t] for r in runs if t in r]) for t in tasks]))
    return out


def _text(c: tuple[float, float | None] | None) -> str:
    if c is None:
        return MISSING
    m, half = c
    return f"{m:.1f}" if half is None else f"{m:.1f} ± {half:.1f}"


def markdown(sources: Sequence[Source]) -> str:
    """The comparison as a markdown table with its footnotes."""
    tasks = columns(sources)
    metrics = {k: v for s in sources for k, v in s.metrics.items()}
    header = ["source", "setting", "runs"] + [
        f"{t} ({metrics[t]})" if t in metrics else t for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, setting, n, cells in rows(sources, tasks):
        lines.append("| " + " | ".join([label, setting, str(n)] + [_text(c) for c in cells])
                     + " |")
    lines += ["", "Test split; mean ± half-width of the 95% confidence interval (Student's t) "
              f"over each row's runs (one run: its value); {MISSING}: not scored by that source."]
    skipped = sum(s.skipped for s in sources)
    if skipped:
        lines.append(f"Left out: {skipped} run(s) whose summary.json records no test scores "
                     "(training stopped on non-finite values).")
    return "\n".join(lines) + "\n"


def to_csv(sources: Sequence[Source]) -> str:
    """The comparison as CSV: source, setting, runs, then per task its mean and CI half-width
    (empty where missing or for one run)."""
    tasks = columns(sources)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["source", "setting", "runs"] + [h for t in tasks for h in (t, f"{t} ci95")])
    for label, setting, n, cells in rows(sources, tasks):
        values = [v for c in cells for v in
                  (("", "") if c is None else (f"{c[0]:.4f}", "" if c[1] is None
                                               else f"{c[1]:.4f}"))]
        writer.writerow([label, setting, n] + values)
    return buffer.getvalue()


def compare(paths: Sequence[str | Path], out: str | Path | None = None) -> str:
    """The markdown table of ``paths`` (module doc); with ``out``, also written there as
    markdown (``.md``) or CSV (``.csv``). Every path is read before anything is written."""
    if not paths:
        raise ValueError("polytask compare: give at least one run or ablation directory")
    if out is not None and Path(out).suffix not in FORMATS:
        raise ValueError(f"--out {out}: unknown format {Path(out).suffix or '(no suffix)'!r}; "
                         f"choose a file ending in {' or '.join(FORMATS)}")
    sources = [load_source(p) for p in paths]
    table = markdown(sources)
    if out is not None:
        text = table if Path(out).suffix == ".md" else to_csv(sources)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return table
