"""The ablation table: ``results.csv`` -> its statistics and ``table.md``.

The table (:func:`build_table`, rendered by :func:`render_markdown`; as ``table.csv`` and
``table.tex`` by :mod:`polytask.experiments.table_files`) has one row per grid combination in config
order and one column per task in the run's task order, then the averages and Δm. Each cell is the
mean ± the half-width of its 95% confidence interval over seeds (t distribution; "n=1" for one
seed), marked ``‡`` where it differs from the baseline cell at p < 0.05 (Welch's t-test over seeds,
or with one seed a paired bootstrap over the test examples of ``predictions.jsonl``). Δm is the mean
relative change against the baseline (:mod:`polytask.experiments.stats`). The baseline is the
combination with ``sharing.strategy = none`` and otherwise the same settings when the grid has one,
else the first combination; the footnotes say which, with the grid, seeds and tests used. The best
mean of each column is bold (the smallest for a lower-is-better metric, marked ↓).

Averages: ``average_seen`` (trained tasks) and ``average_held_out`` (held-out tasks, scored
zero-shot) are separate columns; results without them (older runs) show ``average``
(:mod:`polytask.experiments.report` reads the rows and the runs' notes). Held-out task columns
are marked ``†`` and explained in a footnote, as is the number of test examples scored per task;
the caller's ``notes`` (few-shot demonstrations, say) follow them.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.experiments import stats
from polytask.experiments.report import AVERAGES, HELD_OUT_MARK, aggregate

SIGNIFICANT_MARK = "‡"
BOOTSTRAP_RESAMPLES = 10_000
_KEY = re.compile(r", (?=[\w.]+=)")      # a label's "k=v" separator (values may hold ", ")


def baseline_of(combo: str) -> str | None:
    """The single-task combination matching ``combo`` in every other grid key."""
    parts = dict(p.split("=", 1) for p in _KEY.split(combo) if "=" in p)
    if "sharing.strategy" not in parts:
        return None
    parts["sharing.strategy"] = "none"
    return ", ".join(f"{k}={v}" for k, v in parts.items())


def baselines(settings: list[str]) -> tuple[dict[str, str], str]:
    """(``{setting: its baseline}``, the footnote naming the rule): the ``sharing.strategy=none``
    setting with the same other grid values where the grid has one, otherwise the first setting
    in config order (every setting then compares with it)."""
    matched = {s: baseline_of(s) for s in settings}
    plain = "sharing.strategy=none"   # a row with keys of its own (a list grid) compares with
    if plain in settings:             # the plain single-task baseline
        matched = {s: plain if b is not None and b not in settings else b
                   for s, b in matched.items()}
    if settings and all(b in settings for b in matched.values()):
        return ({s: b for s, b in matched.items() if b is not None},
                "baseline: sharing.strategy=none with the same other settings")
    first = settings[0] if settings else ""
    why = ("the grid has no sharing.strategy=none setting" if any(
        b is not None for b in matched.values()) else "the grid does not vary sharing.strategy")
    return {s: first for s in settings}, f"baseline: the first setting, {first} ({why})"


@dataclass
class Cell:
    """One setting × column: the value per seed, mean, 95% CI half-width (None with one seed),
    and the p-value against the baseline cell with the test that gave it."""
    seeds: list[str]
    values: list[float]
    mean: float
    ci: float | None
    p: float | None = None
    test: str | None = None


@dataclass
class Table:
    """Everything the three renderings (markdown, CSV, LaTeX) of an ablation table show."""
    settings: list[str]                   # rows, in config order
    tasks: list[str]                      # task columns, in the run's task order
    columns: list[str]                    # tasks, then the averages
    held: list[str]                       # held-out tasks (marked, averaged apart)
    metrics: dict[str, str]               # column -> metric name, where known
    cells: dict[tuple[str, str], Cell]
    baseline: dict[str, str]              # setting -> baseline setting
    delta_m: dict[str, float | None]      # over the seen tasks
    delta_m_held: dict[str, float | None]  # over the held-out tasks ({} without any)
    footnotes: list[str] = field(default_factory=list)

    def lower_better(self, column: str) -> bool:
        return stats.lower_is_better(self.metrics.get(column, "average"))

    def best(self, column: str) -> float | None:
        means = [c.mean for s in self.settings if (c := self.cells.get((s, column)))]
        if not means:
            return None
        return min(means) if self.lower_better(column) else max(means)

    @property
    def compared(self) -> bool:
        """Whether any setting has a baseline other than itself (else no Δm column)."""
        return any(b != s for s, b in self.baseline.items())


ExampleScores = dict[tuple[str, str], dict[str, dict[str, float]]]


def read_example_scores(path: str | Path) -> dict[str, dict[str, float]] | None:
    """``{task: {example key: score}}`` from a run's ``predictions.jsonl``
    (``experiments.evaluate``: one record per example and template with ``task``, ``template``,
    ``reference`` and ``score``, null for a corpus-level metric). Only the first template counts
    (it is the table's score); an example's key is its position in its task and its reference,
    so two runs pair only the examples they share. Tasks with a null score are left out; None
    when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    out: dict[str, dict[str, float]] = defaultdict(dict)
    corpus: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "task" not in rec or "score" not in rec:
            raise ValueError(f"{path}:{n}: a prediction record needs 'task' and 'score'; "
                             f"got keys {sorted(rec)}")
        task, score = rec["task"], rec["score"]
        if rec.get("template", 0) != 0:
            continue
        if score is None:
            corpus.add(task)
            continue
        key = json.dumps([len(out[task]), rec.get("reference")])
        out[task][key] = 100.0 * score if isinstance(score, bool) else float(score)
    return {t: v for t, v in out.items() if t not in corpus}


def build_table(rows: list[dict[str, str]], metric_names: dict[str, str] | None = None,
                held_out: list[str] | None = None, examples: dict[str, int] | None = None,
                notes: list[str] | None = None, *, grid: dict[str, list[str]] | None = None,
                example_scores: ExampleScores | None = None) -> Table:
    """The ablation table of ``rows`` (``results.csv``): see the module doc. ``metric_names``
    (task -> metric, in the run's task order) orders and heads the task columns; ``grid``
    (key -> values, as run) and the seeds of ``rows`` go into the footnote; ``example_scores``
    (``{(setting, seed): read_example_scores(...)}``) allows a paired bootstrap for settings
    run with one seed."""
    settings, columns, values = aggregate(rows)
    order = list(metric_names or {})
    tasks = sorted((c for c in columns if c not in AVERAGES),
                   key=lambda t: order.index(t) if t in order else len(order))
    columns = tasks + [c for c in columns if c in AVERAGES      # averages the rows hold
                       and any(values.get((s, c)) for s in settings)]
    metrics = {t: m for t, m in (metric_names or {}).items() if t in tasks}
    held = [t for t in tasks if t in set(held_out or [])]
    seeds: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        seeds[(r["combination"], r["task"])].append(str(r.get("seed", "")))
    cells = {k: Cell(seeds[k], v, *stats.mean_ci(v)) for k, v in values.items() if v}
    base, base_note = baselines(settings)
    tests = _test_against_baseline(cells, base, tasks, example_scores or {})
    seen = [t for t in tasks if t not in held]
    table = Table(settings, tasks, columns, held, metrics, cells, base,
                  {s: _delta_m(cells, metrics, s, base[s], seen) for s in settings},
                  {s: _delta_m(cells, metrics, s, base[s], held) for s in settings} if held else {})
    table.footnotes = (_method_notes(table, rows, grid, base_note, tests, example_scores)
                       + _footnotes(held, examples or {}) + list(notes or []))
    return table


def _test_against_baseline(cells: dict[tuple[str, str], Cell], base: dict[str, str],
                           tasks: list[str], scores: ExampleScores) -> dict[str, int]:
    """Fill each cell's p-value against its baseline cell: Welch's t-test over seeds where both
    have two or more, else, where both ran the same one seed, a paired bootstrap over its test
    examples (task columns only, where both runs have per-example scores). -> {test: cells tested,
    "untested": cells left without}."""
    used: dict[str, int] = defaultdict(int)
    for (setting, column), cell in cells.items():
        other = cells.get((base.get(setting, setting), column))
        if other is None or other is cell:
            continue
        if len(cell.values) > 1 and len(other.values) > 1:
            cell.p = stats.welch_p(cell.values, other.values)
            cell.test = "welch" if cell.p is not None else None
            used["no_spread"] += cell.p is None
        elif column in tasks and len(cell.seeds) == 1 and cell.seeds == other.seeds:
            seed = cell.seeds[0]
            a = (scores.get((setting, seed)) or {}).get(column)
            b = (scores.get((base[setting], seed)) or {}).get(column)
            if a and b and (ids := sorted(set(a) & set(b))):
                cell.p = stats.paired_bootstrap_p([a[i] for i in ids], [b[i] for i in ids],
                                                  BOOTSTRAP_RESAMPLES)
                cell.test = "bootstrap"
        if cell.test or len(cell.values) == 1:
            used[cell.test or ("untested" if column in tasks else "untested_average")] += 1
    return used


def _delta_m(cells: dict[tuple[str, str], Cell], metrics: dict[str, str], setting: str,
             baseline: str, tasks: list[str]) -> float | None:
    """Δm of ``setting`` over ``tasks`` (None without every cell on both sides)."""
    pairs = [(cells.get((setting, t)), cells.get((baseline, t))) for t in tasks]
    if setting == baseline or not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return stats.delta_m([a.mean for a, _ in pairs], [b.mean for _, b in pairs],
                         [stats.lower_is_better(metrics.get(t, "")) for t in tasks])


def _method_notes(table: Table, rows: list[dict[str, str]], grid: dict[str, list[str]] | None,
                  base_note: str, tests: dict[str, int], scores: ExampleScores | None) -> list[str]:
    """The footnotes that say what was run and how each number was computed."""
    seeds = list(dict.fromkeys(str(r.get("seed", "")) for r in rows))
    ns = sorted({len(c.values) for c in table.cells.values()})
    n = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]} (some runs missing)"
    grid = grid or _grid_of(table.settings)
    what = ("; ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in grid.items())
            if grid else "; ".join(table.settings))
    out = [f"Grid: {what or 'one setting'}; seeds {{{', '.join(seeds)}}}, {n} runs per setting; "
           "test split.",
           "Mean ± half-width of the 95% confidence interval over seeds (t distribution, n−1 "
           "degrees of freedom); n=1: one seed, no interval. Best mean per column in bold."]
    if table.compared:
        direction = ", sign flipped where lower is better (↓)" if any(
            table.lower_better(t) for t in table.tasks) else ""
        apart = " (Δm held-out: the same over the held-out tasks)" if table.held else ""
        out.append(f"Δm: mean over the seen tasks of the relative change (%) against the "
                   f"baseline{direction} (Maninis et al., 2019){apart}; {base_note}."
                   + (" –: a baseline value is 0 (relative change undefined)." if any(
                       d is None for s, d in table.delta_m.items()
                       if table.baseline[s] != s) else ""))
        unknown = [f"{t} ({m})" for t, m in table.metrics.items() if not stats.is_known(m)]
        if unknown:
            out.append("Direction unknown, taken as higher-better: " + ", ".join(unknown) + ".")
        out.append(_significance_note(tests, scores))
    return out


def _grid_of(settings: list[str]) -> dict[str, list[str]]:
    """The grid read back from the settings' ``k=v, ...`` labels ({} if one is not a label)."""
    grid: dict[str, list[str]] = {}
    for s in settings:
        parts = _KEY.split(s)
        if not all("=" in p for p in parts):
            return {}
        for k, v in (p.split("=", 1) for p in parts):
            values = grid.setdefault(k, [])
            if v not in values:
                values.append(v)
    return grid


def _significance_note(tests: dict[str, int], scores: ExampleScores | None) -> str:
    how = []
    if tests.get("welch"):
        how.append("Welch's t-test over seeds")
    if tests.get("bootstrap"):
        how.append(f"a paired bootstrap over test examples ({BOOTSTRAP_RESAMPLES:,} resamples) "
                   "where one seed ran")
    text = (f"{SIGNIFICANT_MARK} p < {stats.ALPHA} against the baseline cell: "
            + (" and ".join(how) if how else "no cell could be tested") + ".")
    if tests.get("untested"):
        why = ("no per-example scores (predictions.jsonl) to bootstrap"
               if not any(v for v in (scores or {}).values()) else
               "no per-example scores for them in predictions.jsonl (a corpus-level metric, "
               "or runs without the file)")
        text += f" {tests['untested']} task cell(s) untested: {why}."
    if tests.get("no_spread"):
        text += (f" {tests['no_spread']} cell(s) not tested: the same value in every seed on "
                 "both sides.")
    if tests.get("untested_average"):
        text += f" Averages of one seed ({tests['untested_average']} cell(s)) are not tested."
    return text


def _header(table: Table, column: str, held_mark: str = HELD_OUT_MARK,
            down: str = " ↓") -> str:
    name = f"{column}{held_mark}" if column in table.held else column
    if column in table.metrics:
        name += f" ({table.metrics[column]})"
    return name + (down if table.lower_better(column) else "")


def _cell_text(table: Table, setting: str, column: str) -> str:
    cell = table.cells.get((setting, column))
    if cell is None:
        return "–"
    text = f"{cell.mean:.1f} " + ("(n=1)" if cell.ci is None else f"± {cell.ci:.1f}")
    best = table.best(column)
    if best is not None and abs(cell.mean - best) < 1e-9:
        text = f"**{text}**"
    return text + (SIGNIFICANT_MARK if stats.significant(cell.p) else "")


def _delta_text(table: Table, setting: str, held: bool = False) -> str:
    deltas = table.delta_m_held if held else table.delta_m
    if table.baseline.get(setting) == setting:
        return "baseline"
    d = deltas.get(setting)
    if d is None:
        return "–"
    top = max((v for v in deltas.values() if v is not None), default=None)
    return f"**{d:+.2f}**" if top is not None and abs(d - top) < 1e-9 else f"{d:+.2f}"


def render_markdown(table: Table) -> str:
    header = ["setting"] + [_header(table, c) for c in table.columns]
    if table.compared:
        header += ["Δm (%)"] + (["Δm held-out (%)"] if table.held else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in table.settings:
        out = [s] + [_cell_text(table, s, c) for c in table.columns]
        if table.compared:
            out += [_delta_text(table, s)] + ([_delta_text(table, s, True)] if table.held else [])
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines + [""] + table.footnotes) + "\n"


def markdown_table(rows: list[dict[str, str]], metric_names: dict[str, str] | None = None,
                   held_out: list[str] | None = None,
                   examples: dict[str, int] | None = None,
                   notes: list[str] | None = None, **options: Any) -> str:
    """``table.md``: :func:`build_table` (same arguments) rendered as markdown."""
    return render_markdown(build_table(rows, metric_names, held_out, examples, notes, **options))


def _footnotes(held: list[str], examples: dict[str, int]) -> list[str]:
    out = []
    if held:
        out.append(f"{HELD_OUT_MARK} held out ({', '.join(held)}): never trained, scored zero-shot; "
                   "in average_held_out only, never in average_seen or checkpoint selection.")
    if examples:
        out.append("Test examples scored per task: "
                   + ", ".join(f"{t} {n}" for t, n in examples.items()) + ".")
    return out
