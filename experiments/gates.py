"""The gates of a mixture-of-experts run (``sharing.strategy: mmoe | ple``): ``gates.png``, one
task x expert heatmap per layer of the mean gate weights: :func:`plot_gates`.

Each evaluation of such a run logs ``{"event": "gates", "step", "layers": {slot: {task:
{expert: weight}}}}`` in ``metrics.jsonl`` (:func:`polytask.heads.experts.gate_table` on the
step's last micro-batch). The figure shows the LAST event: the mixture the run ended with.
Under ``ple`` a task only gates the shared experts (``s0``, ...) and its own (``<task>.0``,
...); the other tasks' own experts are grey cells.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_gates(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The run's gate events by step (a resumed run re-logs steps: the last record wins)."""
    path = Path(metrics_path)
    events: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        rec: dict[str, Any] = json.loads(line)
        if rec.get("event") == "gates":
            if not isinstance(rec.get("layers"), dict):
                raise ValueError(f"{path}:{n}: gates event at step {rec.get('step')} has no "
                                 f"'layers' mapping; expected {{slot: {{task: {{expert: w}}}}}}")
            events[int(rec["step"])] = rec
    return [events[s] for s in sorted(events)]


def gate_matrix(layer: dict[str, dict[str, float]]) -> tuple[list[str], list[str], Any]:
    """(tasks, experts in order of first appearance, weights ``(tasks, experts)``; NaN where a
    task cannot use the expert)."""
    import numpy as np

    tasks = list(layer)
    experts: list[str] = []
    for weights in layer.values():
        experts += [e for e in weights if e not in experts]
    grid = np.full((len(tasks), len(experts)), np.nan)
    for i, t in enumerate(tasks):
        for e, w in layer[t].items():
            grid[i, experts.index(e)] = w
    return tasks, experts, grid


def plot_gates(run_dir: str | Path, path: str | Path | None = None, title: str = "") -> Path:
    """Draw ``gates.png`` (or ``path``) for the run in ``run_dir``: one heatmap per layer of
    its last gates event (``title`` leads the figure's title). A run without gate events is an
    error naming the file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = Path(run_dir) / "metrics.jsonl"
    events = read_gates(metrics)
    if not events:
        raise ValueError(f"{metrics}: no 'gates' event; only runs with sharing.strategy 'mmoe' "
                         "or 'ple' log them (at each evaluation)")
    last = events[-1]
    slots = list(last["layers"])
    cols = min(4, len(slots))
    rows = -(-len(slots) // cols)
    width = max(2.6, 0.55 * max(len(gate_matrix(last["layers"][s])[1]) for s in slots) + 1.4)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width + 1.0, rows * 2.8 + 0.6),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    image = None
    for ax, slot in zip(axes.flat, slots):
        tasks, experts, grid = gate_matrix(last["layers"][slot])
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(experts)), experts, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_title(slot, fontsize=10)
        for (i, j), w in np.ndenumerate(grid):
            if not np.isnan(w):
                ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if w > 0.6 else "white")
    for ax in axes.flat[len(slots):]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="mean gate weight (real tokens)")
    fig.suptitle(f"{title + ': ' if title else ''}expert gates per layer at step "
                 f"{last['step']} (grey: not the task's expert)", fontsize=10)
    out = Path(path) if path is not None else Path(run_dir) / "gates.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def write_gates(out: str | Path, runs: list[tuple[str, Path]]) -> dict[str, Path]:
    """An ablation's gate figures: ``gates_<k>.png`` for the first run (seed) of every setting
    whose runs logged gates, the setting named in the figure's title. ``runs``: (setting,
    run directory) in ablation order. Returns ``{"gates <setting>": path}``."""
    written: dict[str, Path] = {}
    for setting, run_dir in runs:
        key = f"gates {setting}"
        if key in written or not read_gates(Path(run_dir) / "metrics.jsonl"):
            continue
        written[key] = plot_gates(run_dir, Path(out) / f"gates_{len(written) + 1}.png",
                                  title=setting)
    return written
