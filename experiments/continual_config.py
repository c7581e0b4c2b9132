"""The continual-learning part of a run config: ``stages:`` (checked against the run's tasks
by :func:`check_stages`) and the ``continual:`` section (:class:`ContinualConfig`), read by
:mod:`polytask.experiments.continual`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from polytask.core.model.fields import bounds, check_fields, short_repr


@dataclass
class ContinualConfig:
    """How a run with ``stages:`` fights forgetting (:mod:`polytask.experiments.continual`)."""

    # fraction of each batch drawn from earlier stages' training data (experience replay)
    replay: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    # penalty pulling the weights towards earlier stages' (losses.anchoring)
    regularization: Literal["none", "l2", "ewc"] = "none"
    # lambda of the penalty lambda/2 * sum_i F_i (theta_i - theta*_i)^2
    weight: float = field(default=1.0, metadata=bounds(ge=0))
    # EWC: training examples of a finished stage's tasks its diagonal Fisher averages over
    fisher_examples: int = field(default=64, metadata=bounds(gt=0))
    # set by the continual runner in each stage's own config.json (1..T; 0: the initial
    # model): its held-out tasks are the other stages' and may have untrained heads
    stage: int | None = field(default=None, metadata=bounds(ge=0, null="not a stage's run"))

    def __post_init__(self) -> None:
        check_fields(self, "continual")   # types and the bounds above


def check_stages(stages: Any, tasks: list[str]) -> list[list[str]]:
    """``stages:`` is a list of non-empty lists of the run's task names, each task in exactly
    one stage; anything else is one ``ValueError`` naming the bad value and the tasks."""
    known = ", ".join(tasks)
    if not isinstance(stages, list) or not stages or not all(
            isinstance(s, list) and s and all(isinstance(t, str) for t in s) for s in stages):
        raise ValueError(f"stages = {short_repr(stages)} is invalid: expected a list of "
                         f"non-empty lists of task names, e.g. [[a, b], [c]]; tasks: {known}")
    seen: dict[str, int] = {}
    for i, stage in enumerate(stages):
        for name in stage:
            if name not in tasks:
                raise ValueError(f"stages[{i}] names unknown task {name!r}; tasks: {known}")
            if name in seen:
                raise ValueError(f"stages: task {name!r} is in stage {seen[name]} and stage "
                                 f"{i}; each task belongs to exactly one stage; tasks: {known}")
            seen[name] = i
    missing = [t for t in tasks if t not in seen]
    if missing:
        raise ValueError(f"stages: task {missing[0]!r} is in no stage; each of the tasks "
                         f"{known} belongs to exactly one stage")
    return [list(s) for s in stages]
