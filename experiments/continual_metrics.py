"""Continual-learning metrics (Lopez-Paz & Ranzato 2017, GEM, section 2).

``R[i][j]`` is the test score of task j after training stage i (row 0: the initial model,
before stage 1, which gives forward transfer's baseline ``b_j``). With T stages:

    ACC = mean_j R[T][j]                          (every task, after the last stage)
    BWT = mean_{j learned before stage T} R[T][j] - R[s(j)][j]
    FWT = mean_{j learned after stage 1}  R[s(j) - 1][j] - b_j

Per task, not per stage: a stage may teach several tasks, so ``s(j)`` is the (1-based) stage
in which task j is learned; BWT runs over the tasks of stages 1..T-1 (the paper's j < T) and
FWT over those of stages 2..T (the paper's j > 1), each task weighing the same. The scores
are whatever each task's main metric is (0-100 here), so means mix metrics as the table's
``average`` does.
"""
from __future__ import annotations

from statistics import mean
from typing import Any


def _check(matrix: list[list[float]], stage_of: list[int]) -> int:
    stages = len(matrix) - 1
    if stages < 1:
        raise ValueError(f"the accuracy matrix needs the initial row and one row per stage, "
                         f"got {len(matrix)} row(s)")
    for i, row in enumerate(matrix):
        if len(row) != len(stage_of):
            raise ValueError(f"accuracy matrix row {i} has {len(row)} scores for "
                             f"{len(stage_of)} tasks")
    bad = [s for s in stage_of if not 1 <= s <= stages]
    if bad:
        raise ValueError(f"task stage {bad[0]} is outside 1..{stages}")
    return stages


def average_accuracy(matrix: list[list[float]], stage_of: list[int]) -> float:
    """ACC: the mean score of every task after the last stage."""
    stages = _check(matrix, stage_of)
    return mean(matrix[stages])


def backward_transfer(matrix: list[list[float]], stage_of: list[int]) -> float | None:
    """BWT: how the last stage's model scores each earlier-stage task against right after that
    task's stage (negative: forgetting). ``None`` with one stage (no earlier task)."""
    stages = _check(matrix, stage_of)
    gaps = [matrix[stages][j] - matrix[s][j] for j, s in enumerate(stage_of) if s < stages]
    return mean(gaps) if gaps else None


def forward_transfer(matrix: list[list[float]], stage_of: list[int]) -> float | None:
    """FWT: each later-stage task's score just before its stage against the initial model's
    (positive: earlier stages helped it zero-shot). ``None`` with one stage."""
    _check(matrix, stage_of)
    gaps = [matrix[s - 1][j] - matrix[0][j] for j, s in enumerate(stage_of) if s > 1]
    return mean(gaps) if gaps else None


def continual_summary(matrix: list[list[float]], tasks: list[str],
                      stages: list[list[str]]) -> dict[str, Any]:
    """``summary.json["continual"]``: the matrix (rows: initial, stage 1..T; columns:
    ``tasks``), ACC, BWT, FWT, the stages and the tasks."""
    where = {t: i + 1 for i, stage in enumerate(stages) for t in stage}
    stage_of = [where[t] for t in tasks]
    return {"accuracy_matrix": matrix, "average": average_accuracy(matrix, stage_of),
            "backward_transfer": backward_transfer(matrix, stage_of),
            "forward_transfer": forward_transfer(matrix, stage_of),
            "stages": stages, "tasks": tasks}
