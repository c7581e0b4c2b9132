"""Glue between a run config and the training loop: resolve tasks, start or resume a run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from polytask.core.data.tasks import TaskSpec
from polytask.experiments.config import RunConfig


def resolve_tasks(cfg: RunConfig) -> list[TaskSpec]:
    """``tasks: <suite name>`` -> the built-in suite's specs; a list is used as given."""
    if isinstance(cfg.tasks, str):
        from polytask.experiments.suite import load_suite
        return load_suite(cfg.tasks)
    return list(cfg.tasks)


def train_run(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
              progress: bool = True) -> dict[str, Any]:
    from polytask.experiments.train import train
    return train(cfg, resolve_tasks(cfg), Path(run_dir), resume=resume, progress=progress)


def metric_names(summary: dict[str, Any]) -> dict[str, str]:
    return dict(summary.get("metrics", {}))
