"""``polytask ablate CONFIG``: a grid of settings × seeds -> results.csv, table.md, plots.

An ablation config is a run config plus::

    grid:  {sharing.strategy: [none, hard, soft, hierarchical]}   # dotted key -> values
    seeds: [0, 1, 2]

Every combination of grid values is run once per seed in ``OUT/runs/<name>``. A run whose
``summary.json`` exists is complete and skipped; a run with a checkpoint but no summary is
resumed — so an interrupted ablation continues where it stopped. The runs are read back from
their directories to write the reports, so the outputs never depend on which runs happened in
this invocation.
"""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

from core.checkpoint import latest_checkpoint
from experiments import report
from experiments.config import RunConfig, apply_overrides, load_yaml, parse_overrides
from experiments.runs import metric_names, train_run


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"grid must map dotted keys to non-empty lists, got {grid!r}")
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def combo_label(combo: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in combo.items()) or "base"


def run_name(combo: dict[str, Any], seed: int) -> str:
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in combo.items()] + [f"seed-{seed}"]
    return "_".join(str(p).replace("/", "-").replace(" ", "") for p in parts)


def plan(path: str | Path, overrides: list[str] | None = None) -> list[tuple[str, dict, int, RunConfig]]:
    """Validate the whole ablation before running anything: (name, combo, seed, config)."""
    data = load_yaml(path)
    grid = data.pop("grid", {}) or {}
    seeds = data.pop("seeds", [0])
    settings = parse_overrides(overrides or [])
    for key in list(settings):  # grid.KEY=[...] and seeds=[...] override the grid itself
        if key == "seeds":
            seeds = settings.pop(key)
        elif key.startswith("grid."):
            value = settings.pop(key)
            grid[key[len("grid."):]] = value if isinstance(value, list) else [value]
    data = apply_overrides(data, settings)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    runs = []
    for combo in expand_grid(grid) if grid else [{}]:
        for seed in seeds:
            cfg = RunConfig.from_dict(apply_overrides(data, {**combo, "train.seed": seed}))
            runs.append((run_name(combo, seed), combo, seed, cfg))
    return runs


def ablate(path: str | Path, out_dir: str | Path, overrides: list[str] | None = None,
           progress: bool = True) -> dict[str, Path]:
    runs = plan(path, overrides)
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for i, (name, combo, seed, cfg) in enumerate(runs):
        run_dir = out / "runs" / name
        if (run_dir / "summary.json").exists():
            print(f"[{i + 1}/{len(runs)}] {name}: complete, skipped")
            continue
        resume = latest_checkpoint(run_dir) is not None
        print(f"[{i + 1}/{len(runs)}] {name}: {'resuming' if resume else 'training'}")
        train_run(cfg, run_dir, resume=resume, progress=progress)
    return write_reports(out, runs)


def write_reports(out: Path, runs: list[tuple[str, dict, int, RunConfig]]) -> dict[str, Path]:
    rows, curves = [], {}
    names: dict[str, str] = {}
    for name, combo, seed, cfg in runs:
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        label = combo_label(combo)
        names.update(metric_names(summary))
        for task, value in summary["test"].items():
            rows.append({"combination": label, "seed": seed, "run": name, "task": task,
                         "metric": names.get(task, "average"), "value": f"{value:.4f}",
                         **{k: v for k, v in combo.items()}})
        curves.setdefault(label, []).append(report.read_curve(out / "runs" / name / "metrics.jsonl"))
    paths = {"results": out / "results.csv", "table": out / "table.md",
             "bars": out / "metrics.png", "curves": out / "training_curves.png"}
    fieldnames = ["combination", "seed", "run", "task", "metric", "value"] + \
        [k for k in (runs[0][1] if runs else {})]
    with open(paths["results"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    csv_rows = report.read_results(paths["results"])
    paths["table"].write_text(report.markdown_table(csv_rows, names))
    report.plot_bars(csv_rows, paths["bars"])
    report.plot_curves(curves, paths["curves"])
    return paths
