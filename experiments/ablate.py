"""``polytask ablate CONFIG``: a grid of settings × seeds -> results.csv, table.md, plots.

An ablation config is a run config plus::

    grid:  {sharing.strategy: [none, hard, soft, hierarchical]}   # dotted key -> values
    seeds: [0, 1, 2]

and optionally ``merge: {methods: [task_arithmetic, ties], scale: 0.3, density: 0.2}``
(the options of :mod:`polytask.core.merging`; each method takes those it knows).

Every combination of grid values is run once per seed in ``OUT/runs/<name>``. With ``merge:``,
every run with ``sharing.strategy: none`` (it needs ``init:``) is then merged by each method
into ``OUT/runs/<its name, strategy-merged-METHOD>`` (:func:`polytask.experiments.merge.
merge_runs`), a row ``sharing.strategy=merged (METHOD)`` of results.csv and the table, whose
baseline is that ``none`` run's setting.

A run whose ``summary.json`` exists is complete and skipped; a run with a checkpoint but no
summary is resumed — so an interrupted ablation continues where it stopped (a merged run
without a summary is merged again). The runs are read back from their directories to write
the reports, so the outputs never depend on which runs happened in this invocation.

``jobs > 1`` trains that many runs at once, each in its own process with ``threads`` torch
threads (default: the machine's cores divided among the jobs). Small models gain most: on 2
cores, two 1-thread runs of the ``quick`` config finish in 19 s where two 2-thread runs one
after the other take 42 s (kernels of a d_model-64 model are too small to use two threads
well). A run's numbers depend on its thread count (reduction order), not on ``jobs``.

No run outlives the ablation. Each worker asks Linux to kill it when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), so a ``kill -9`` of ``polytask ablate`` takes its workers along
(on other systems it does not); SIGINT (Ctrl-C) and SIGTERM stop the workers and exit with one
line (status 128 + the signal). The killed runs resume from their
last intact checkpoint next time; a run killed before its first checkpoint has nothing to
resume, so its directory is moved aside to ``NAME.interrupted-<time>`` (never deleted) and the
run starts afresh.
"""
from __future__ import annotations

import csv
import ctypes
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from tqdm import tqdm

from polytask.core.training.checkpoint import latest_checkpoint
from polytask.core.training.lock import LOCK as RUN_LOCK, hold as hold_run_dir
from polytask.experiments import conflicts, gates, plots, report
from polytask.experiments.config import RunConfig
from polytask.experiments.config_files import apply_overrides, load_yaml, parse_overrides
from polytask.experiments.merge import merge_plan, merge_runs, merge_settings
from polytask.experiments.runs import metric_names, train_run
from polytask.experiments.table import build_table, read_example_scores
from polytask.experiments.table_files import write_table


def expand_grid(grid: dict[str, list[Any]] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values (a mapping of dotted keys to lists), or the
    combinations as listed (a list of mappings: rows that vary different keys, e.g. a
    strategy with its own options next to plain strategies)."""
    if isinstance(grid, list):
        if not grid or not all(isinstance(c, dict) and c and all(isinstance(k, str) for k in c)
                               for c in grid):
            raise ValueError(f"grid as a list must hold mappings of dotted keys to values, got "
                             f"{grid!r}")
        return [dict(c) for c in grid]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"grid must map dotted keys to non-empty lists, got {grid!r}")
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _label(value: Any) -> str:
    """A grid value as written in YAML's flow style: ``{method: lora, r: 4}``, ``[a, b]``."""
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return str(value)


def _slug(value: Any) -> str:
    """A grid value in a run directory's name: a mapping as ``lora-r4`` (a ``method`` key by
    its value, other keys glued to theirs), an empty one as ``none``."""
    if isinstance(value, dict):
        return "-".join(str(v) if k == "method" else f"{k}{_slug(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return "-".join(_slug(v) for v in value) or "none"
    return str(value)


def combo_label(combo: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_label(v)}" for k, v in combo.items()) or "base"


def run_name(combo: dict[str, Any], seed: int) -> str:
    parts = [f"{k.split('.')[-1]}-{_slug(v)}" for k, v in combo.items()] + [f"seed-{seed}"]
    return "_".join(str(p).replace("/", "-").replace(" ", "") for p in parts)


def plan(path: str | Path, overrides: list[str] | None = None) -> list[tuple[str, dict, int, RunConfig]]:
    """Validate the whole ablation before running anything: (name, combo, seed, config)."""
    data = load_yaml(path)
    grid = data.pop("grid", {}) or {}
    seeds = data.pop("seeds", [0])
    data.pop("merge", None)                       # read by merge_settings
    settings = parse_overrides(overrides or [])
    for key in list(settings):  # grid.KEY=[...] and seeds=[...] override the grid itself
        if key == "merge" or key.startswith("merge."):
            settings.pop(key)
        elif key == "seeds":
            seeds = settings.pop(key)
        elif key.startswith("grid."):
            value = settings.pop(key)
            if isinstance(grid, list):
                raise ValueError(f"override {key}: the grid is a list of combinations; edit "
                                 "the config's grid instead")
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


def run_merges(out: Path, merged: list, methods: dict[str, dict]) -> None:
    """Write every merged run not complete yet (an unfinished one is redone)."""
    for i, (name, _, _, _, source, method) in enumerate(merged):
        run_dir = out / "runs" / name
        if (run_dir / "summary.json").exists():
            print(f"[merge {i + 1}/{len(merged)}] {name}: complete, skipped")
            continue
        print(f"[merge {i + 1}/{len(merged)}] {name}: {method} of {source}")
        merge_runs([out / "runs" / source], method, methods[method], run_dir)


def ablate(path: str | Path, out_dir: str | Path, overrides: list[str] | None = None,
           progress: bool = True, jobs: int = 1, threads: int | None = None) -> dict[str, Path]:
    """Run (or resume) every run of the ablation, then write the reports; see the module
    docstring for ``jobs``, ``threads`` and interruptions."""
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"jobs ({jobs}) and threads ({threads}) must be positive")
    runs = plan(path, overrides)
    methods = merge_settings(path, overrides)
    merged = merge_plan(runs, methods, run_name)
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    todo = []
    for i, (name, combo, seed, cfg) in enumerate(runs):
        run_dir = out / "runs" / name
        if (run_dir / "summary.json").exists():
            print(f"[{i + 1}/{len(runs)}] {name}: complete, skipped")
            continue
        resume = latest_checkpoint(run_dir) is not None
        if not resume and _holds_files(run_dir):
            aside = _move_aside(run_dir)
            print(f"[{i + 1}/{len(runs)}] {name}: interrupted before its first intact checkpoint; "
                  f"its files moved to {aside.name}, starting afresh")
        todo.append((i, name, cfg, run_dir, resume))
    try:
        with _signals_interrupt():
            if jobs == 1:
                for i, name, cfg, run_dir, resume in todo:
                    print(f"[{i + 1}/{len(runs)}] {name}: {'resuming' if resume else 'training'}")
                    train_run(cfg, run_dir, resume=resume, progress=progress)
            elif todo:
                _run_parallel(todo, len(runs), jobs,
                              threads or max(1, (os.cpu_count() or 1) // jobs))
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"polytask: ablation interrupted by {signal.Signals(signum).name}: runs in progress "
              f"stopped, finished runs and checkpoints kept in {out}; run the same command again "
              f"to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    run_merges(out, merged, methods)
    return write_reports(out, runs, [m[:4] for m in merged])


def _holds_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything of a run (its lock file alone is nothing)."""
    return run_dir.is_dir() and any(p.name != RUN_LOCK for p in run_dir.iterdir())


def _move_aside(run_dir: Path) -> Path:
    """Rename a run directory that holds no resumable work (files of a run killed before its
    first intact checkpoint, which a fresh run would refuse to mix with) to
    ``NAME.interrupted-<time>``; the files are kept for whoever wants to look at them. Under
    the run directory's lock: one that some process still writes is refused, naming it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.interrupted-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.interrupted-{stamp}-{n}")
    with hold_run_dir(run_dir, "polytask ablate"):
        run_dir.rename(aside)
    return aside


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the ablation; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Interrupted` in the main thread, so that the code
    unwinding from it can stop the workers (SIGTERM's default would kill this process alone).
    The first signal disarms both: a second Ctrl-C cannot cut the clean-up short. Outside the
    main thread Python cannot set handlers; the defaults stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)

    def interrupt(signum: int, frame: Any) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, however it dies (a ``kill -9``
    runs no clean-up of the parent's). The parent may have died before the request took
    effect: then it is no longer our parent, and we leave at once. Other systems have no such
    request: there a worker outlives a killed parent (the pool's pipes stay open, as the other
    workers hold them too)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(threads: int, parent: int) -> None:
    _die_with_parent(parent)
    # Ctrl-C reaches every process of the terminal's group: the parent alone decides, and
    # stops the workers (a KeyboardInterrupt here would print a traceback per worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a named semaphore, which a worker stopped by a signal leaks (the
    # resource tracker then warns); a worker shows no progress bars, a thread lock will do.
    tqdm.set_lock(threading.RLock())
    import torch
    torch.set_num_threads(threads)


def _train_quietly(cfg: RunConfig, run_dir: Path, resume: bool) -> float:
    start = time.perf_counter()
    train_run(cfg, run_dir, resume=resume, progress=False)
    return time.perf_counter() - start


@contextmanager
def _worker_pool(jobs: int, threads: int) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``jobs`` spawned workers (no state shared with this process). Leaving it
    normally, or by a failed run, waits for the runs in progress; leaving it by an interrupt
    (KeyboardInterrupt, a signal, SystemExit) stops the workers first, since waiting for them
    would mean finishing their runs."""
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, os.getpid()))
    done = False
    try:
        try:
            yield pool
        except Exception:
            pool.shutdown(wait=True, cancel_futures=True)
            done = True
            raise
        pool.shutdown(wait=True)
        done = True
    finally:
        if not done:
            _stop(set(multiprocessing.active_children()) - before)
            pool.shutdown(wait=True, cancel_futures=True)   # prompt now: nobody is working


def _stop(workers: set, grace: float = 5.0) -> None:
    """SIGTERM the workers, then SIGKILL those still alive after ``grace`` seconds. Waits on
    their sentinels rather than joining them, which would race the pool's own reaping."""
    for worker in workers:
        worker.terminate()
    alive = {worker.sentinel: worker for worker in workers}
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        for ended in multiprocessing.connection.wait(list(alive), deadline - time.monotonic()):
            alive.pop(ended)
    for worker in alive.values():
        worker.kill()


def _run_parallel(todo: list, total: int, jobs: int, threads: int) -> None:
    """Train the runs of ``todo`` in ``jobs`` worker processes. A failed run stops the
    ablation with its name; finished runs stay finished."""
    print(f"training {len(todo)} runs, {jobs} at a time, {threads} thread(s) each", flush=True)
    with _worker_pool(jobs, threads) as pool:
        futures = {}
        for i, name, cfg, run_dir, resume in todo:
            print(f"[{i + 1}/{total}] {name}: {'resuming' if resume else 'training'}", flush=True)
            futures[pool.submit(_train_quietly, cfg, run_dir, resume)] = (i, name)
        for future in as_completed(futures):
            i, name = futures[future]
            try:
                seconds = future.result()
            except Exception as err:
                for other in futures:
                    other.cancel()
                # a user error in a run (bad data, damaged file ...) stays a user error (exit 2)
                user = isinstance(err, (ValueError, OSError, KeyError, FloatingPointError))
                raise (ValueError if user else RuntimeError)(f"run {name} failed: {err}") from err
            print(f"[{i + 1}/{total}] {name}: done in {seconds:.0f} s", flush=True)


def write_reports(out: Path, runs: list[tuple[str, dict, int, RunConfig]],
                  merged: list[tuple[str, dict, int, RunConfig]] | None = None
                  ) -> dict[str, Path]:
    """results.csv, the table, plots and conflicts of ``runs`` and the ``merged`` runs (rows
    after the grid's; the grid footnote names the grid as run)."""
    grid_runs, runs = runs, runs + list(merged or [])
    rows, summaries, labelled = [], [], []
    names: dict[str, str] = {}
    gradients: dict[str, list] = {}   # setting -> [(seed, run, gradient events, last step)]
    for name, combo, seed, cfg in runs:
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        summaries.append(summary)
        label = combo_label(combo)
        labelled.append((label, summary))
        names.update(metric_names(summary))
        for task, value in summary["test"].items():
            rows.append({"combination": label, "seed": seed, "run": name, "task": task,
                         "metric": names.get(task, "average"), "value": f"{value:.4f}",
                         **{k: v for k, v in combo.items()}})
        gradients.setdefault(label, []).append(
            (seed, name, *conflicts.read_gradients(out / "runs" / name / "metrics.jsonl")))
    paths = {"results": out / "results.csv", "table": out / "table.md"}
    fieldnames = ["combination", "seed", "run", "task", "metric", "value"] + \
        list(dict.fromkeys(k for _, combo, _, _ in runs for k in combo))
    with open(paths["results"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    csv_rows = report.read_results(paths["results"])
    held, examples = report.run_notes(summaries)
    keys = dict.fromkeys(k for _, c, _, _ in grid_runs for k in c)
    grid = {k: list(dict.fromkeys(_label(c[k]) for _, c, _, _ in grid_runs if k in c))
            for k in keys}
    scores = {(combo_label(c), str(seed)): read_example_scores(
        out / "runs" / name / "predictions.jsonl") for name, c, seed, _ in runs}
    table = build_table(csv_rows, names, held, examples,
                        notes=report.evaluation_notes(summaries), grid=grid,
                        example_scores=scores)
    paths.update(write_table(table, out))   # table.md, table.csv, table.tex
    templates = report.template_table(labelled)
    if templates is not None:      # data.eval_templates: all
        paths["templates"] = out / "table_templates.md"
        paths["templates"].write_text(templates)
    # metrics.png, validation_curves.png, training_losses.png (+ weighted_losses.png)
    paths.update(plots.write_figures(out, [(combo_label(c), out / "runs" / n, cfg.weighting.method
                                            if cfg is not None else "") for n, c, _, cfg in runs]))
    paths.update(conflicts.write_conflicts(gradients, out))   # only the files it wrote
    paths.update(gates.write_gates(out, [(combo_label(c), out / "runs" / n)
                                         for n, c, _, _ in runs]))
    return paths
