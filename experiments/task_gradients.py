"""Per-task gradients for the training loop, in one pass, and the gradient-conflict diagnostics.

For a gradient weighting (:class:`polytask.losses.weighting.base.GradientWeighting`, PCGrad,
MGDA, CAGrad ...) :func:`splits_tasks` says whether the step can form the per-task gradients
in one pass: each task's rows of a micro-batch forward and backward on their own graph
(:func:`polytask.losses.weighting.engine.split_backward`) instead of k backward passes over
the mixed batch's joint graph. :func:`_split_backward` does that for one micro-batch and
returns the engine's :class:`~polytask.losses.weighting.engine.SplitGradients`; the loop
(:func:`polytask.experiments.train._accumulate`) merges a step's micro-batches and lets the
weighting combine them once per step.

Under data parallelism every rank takes the tasks present on *any* rank and scales its local
loss by its share of each task's global loss units, so the ranks' average of the ``(k, P)``
gradient matrices is the global batch's, and the logged losses are global values.

:func:`gradient_conflicts` runs the same engine on the step's last micro-batch at each
evaluation, without touching ``.grad`` or torch's RNG, and reports the tasks' pairwise cosine
similarities and the fraction of conflicting pairs
(:func:`polytask.losses.weighting.engine.conflicts`).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from polytask.core.data.batch import Batch
from polytask.core.training import distributed
from polytask.experiments.build import Parts
from polytask.experiments.config import RunConfig
from polytask.losses.weighting.base import GradientWeighting, run_backward
from polytask.losses.weighting.engine import SplitGradients, conflicts, split_backward


def _full(loss: torch.Tensor) -> torch.Tensor:
    """A loss computed under bf16 autocast in float32; float32 and float64 ones as they are."""
    return loss.float() if loss.dtype in (torch.bfloat16, torch.float16) else loss


def splits_tasks(parts: Parts, model: torch.nn.Module, cfg: RunConfig) -> bool:
    """Whether this step forms per-task gradients in one pass over per-task sub-batches
    (:mod:`polytask.losses.weighting.engine`) instead of k passes over the joint graph: for
    gradient weightings, in one process, when no loss term couples rows of different tasks
    (the adversarial discriminator's, the orthogonality penalty)."""
    return (isinstance(parts.weighting, GradientWeighting)
            and not getattr(parts.weighting, "uses_representation", False)   # MGDA-UB
            and getattr(model, "discriminator", None) is None
            and cfg.sharing.orthogonality_weight == 0)


def _task_rows(batch: Batch, data, names: list[str]) -> dict[str, torch.Tensor]:
    """The row indices of each task present in ``batch``, in run order."""
    rows = {n: (batch.task_ids == data.task_index[n]).nonzero().flatten() for n in names}
    return {n: r for n, r in rows.items() if len(r)}


def _split_backward(cfg: RunConfig, parts: Parts, model: torch.nn.Module, data, batch: Batch,
                    logs: dict[str, float], world: int = 1) -> SplitGradients | None:
    """One micro-batch of a gradient weighting through the engine: each task's rows forward and
    backward on their own graph, giving the per-task gradients (combined by the weighting once
    per step, in :func:`polytask.experiments.train._accumulate`); the extra terms are
    backpropagated here, unweighted. None (nothing accumulated) on a non-finite loss.

    Under data parallelism every rank takes the tasks present on *any* rank, in run order (a
    task without rows here gives a zero row), and scales its local loss by its share of the
    task's global loss units, so that the ranks' average of the ``(k, P)`` matrices (the
    weighting's reducer) is the global batch's, as in one process; the losses are the global
    values too."""
    t = cfg.train
    extras: list[torch.Tensor | None] = []
    balances: list[torch.Tensor] = []   # one per task sub-batch (mmoe / ple with balance_weight)
    rows = _task_rows(batch, data, parts.names)
    names, scale = list(rows), {n: 1.0 for n in rows}
    units = torch.zeros(len(parts.names), dtype=torch.float64)
    if world > 1:
        for i, n in enumerate(parts.names):
            if n in rows:
                head = SimpleNamespace(head=data.specs[n].head_kind, rows=rows[n])
                units[i] = distributed.loss_units(head, batch, parts.reductions[n])
        total = distributed.average(units.clone()) * world
        names = [n for i, n in enumerate(parts.names) if total[i] > 0]
        scale = {n: float(units[i] * world / total[i]) for i, n in enumerate(parts.names)
                 if total[i] > 0}
    anchor = parts.trainable[0].reshape(-1)[0] * 0.0   # a zero on the graph: no rows here

    def task_loss(name: str):
        def run() -> torch.Tensor | None:
            if name not in rows:
                return anchor
            sub = batch.select(rows[name]).trimmed()
            with torch.autocast(torch.device(t.device).type, dtype=torch.bfloat16,
                                enabled=t.bf16):
                result = parts.objective(model, model(sub), sub)
            if not extras:   # the soft-sharing penalty: one term per micro-batch, not per task
                whole = [v for k, v in result.extra.items() if k != "balance"]
                extras.append(torch.stack(whole).sum() / t.grad_accum if whole else None)
            if "balance" in result.extra:   # the gates' load balancing: per task, so averaged
                balances.append(result.extra["balance"] / t.grad_accum)   # over the tasks
            logs.update({k: v for k, v in result.logs.items() if not k.startswith("loss/")})
            loss = result.task_losses.get(name)
            if loss is None:   # rows, but none labelled
                return anchor if world > 1 else None
            return _full(loss) * (scale[name] / t.grad_accum)
        return run

    shared = {id(p) for p in parts.shared}
    split = split_backward({n: task_loss(n) for n in names}, parts.shared,
                           [p for p in parts.trainable if id(p) not in shared],
                           reduce=parts.weighting.gradient_reducer, last_shared=parts.last_shared,
                           is_finite=lambda loss: distributed.all_true(bool(torch.isfinite(loss))))
    extra = extras[0] if extras else None
    if balances:   # the mean of the tasks' means over their gated layers: the joint pass's
        # mean over (layer, task) when every task runs the same layers (a classifier task's
        # encoder-only terms weigh a little more here than in the joint pass)
        balance = torch.stack(balances).mean()
        extra = balance if extra is None else extra + balance
    if not distributed.all_true(split is not None and (extra is None or
                                                        bool(torch.isfinite(extra)))):
        return None
    if world > 1:   # the global loss values: the ranks' losses weighted by their units
        local = torch.zeros(len(parts.names), dtype=torch.float64)
        for name, loss in zip(split.task.names, split.task.losses.tolist()):
            i = parts.names.index(name)
            local[i] = loss / scale[name] * units[i] if scale[name] else 0.0
        value = distributed.average(local) * world / total.clamp_min(1)
        split.task.losses = torch.stack([value[parts.names.index(n)] for n in split.task.names])
    run_backward(None, extra)
    return split


def gradient_conflicts(cfg: RunConfig, parts: Parts, model: torch.nn.Module, data,
                       batch: Batch) -> dict[str, Any] | None:
    """Gradient-conflict diagnostics on ``batch`` (the training loop passes the step's last
    micro-batch at each evaluation): the per-task gradients on the shared parameters, their
    pairwise cosine similarities and the fraction of conflicting pairs
    (:func:`polytask.losses.weighting.engine.conflicts`). Nothing is accumulated into ``.grad``
    and torch's RNG is restored, so the run continues exactly as without it. None when fewer
    than two tasks with a loss are in the batch or nothing is shared."""
    t = cfg.train
    shared = [p for p in parts.shared if p.requires_grad]
    rows = _task_rows(batch, data, parts.names)
    if not shared or len(rows) < 2:
        return None
    autocast = torch.autocast(torch.device(t.device).type, dtype=torch.bfloat16, enabled=t.bf16)
    def task_loss(name: str, r: torch.Tensor):
        def run() -> torch.Tensor | None:
            sub = batch.select(r).trimmed()
            with autocast:
                loss = parts.objective(model, model(sub), sub).task_losses.get(name)
            return None if loss is None else _full(loss)
        return run

    # task losses never couple rows (only extra terms may), so the one-pass engine always applies
    with torch.random.fork_rng(devices=[]):
        split = split_backward({n: task_loss(n, r) for n, r in rows.items()}, shared, [])
    if split is None:
        return None
    matrix, names = split.task.matrix, split.task.names
    if len(names) < 2 or not bool(torch.isfinite(matrix).all()):
        return None
    return conflicts(matrix, names)
