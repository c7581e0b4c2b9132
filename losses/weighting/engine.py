"""Exact per-task gradients at the cost of one backward pass.

In a mixed multi-task batch every row belongs to one task, and a task's loss depends only on its
own rows: attention mixes tokens within a row, never across rows; norms, embeddings and position
biases act per token. The k task losses of the batch therefore live on k *disjoint* graphs if
the forward pass runs once per task on that task's rows — and the forward over all rows costs
the same FLOPs whether it runs as one batch or as k sub-batches. Backpropagating each task's
loss through its own graph then yields its exact gradient, and the k backward passes together
touch every activation once: the FLOPs of one ordinary backward of the whole batch.

The usual way (LibMTL; :func:`polytask.losses.weighting.base.task_gradients`, the reference
path) calls ``autograd.grad(L_i, shared, retain_graph=True)`` k times on the joint graph. Each
call runs through *every* row (rows of other tasks carry zero gradient but still pay the
matrix products), so it costs k backward passes: 3.4x the static step for PCGrad at k = 6.

This splitting holds for every parameter kind (linear, embedding, norm, position bias, LoRA and
adapter weights, cross-stitch units, hierarchical group slots shared by a subset of tasks) and
every kernel (the fast twins and Triton included) without per-operation code: it needs nothing
but the row independence above. It does not hold for terms that couple rows across tasks — the
adversarial discriminator's loss and the orthogonality penalty are computed over the whole batch;
the training loop keeps the reference path for those (:func:`splittable`).

Memory: only one task's activations are alive at a time (less than the joint graph's), plus the
``(k, P)`` gradients on the shared parameters and each task's gradient on the other (private)
parameters it reaches, until the weighting's coefficients are known.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from polytask.losses.weighting.base import GradientReducer, TaskGradients

TaskLoss = Callable[[], "Tensor | None"]
"""Runs the forward pass on one task's rows and returns that task's scalar loss."""


class SplitGradients:
    """Per-task gradients from :func:`split_backward`: ``task`` (the :class:`TaskGradients` on
    the shared parameters, for the weighting) and each task's gradients on the private
    parameters, applied by :meth:`apply` once the weighting has chosen its update and weights."""

    def __init__(self, task: TaskGradients, private: list[Tensor],
                 private_grads: list[list[Tensor | None]]) -> None:
        self.task, self.private, self.private_grads = task, private, private_grads

    def apply(self, update: Tensor, weights: Tensor) -> None:
        """Accumulate ``update`` into the shared parameters' ``.grad`` and ``sum_i w_i grad L_i``
        into the private ones' (like ``loss.backward()``, adding to what is there)."""
        offset = 0
        for p in self.task.params:
            piece = update[offset:offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = piece.clone() if p.grad is None else p.grad + piece
            offset += p.numel()
        for j, p in enumerate(self.private):
            total = None
            for w, grads in zip(weights.tolist(), self.private_grads):
                g = grads[j]
                if g is not None:
                    total = w * g if total is None else total + w * g
            if total is not None:
                p.grad = total if p.grad is None else p.grad + total


def merge(splits: Sequence[SplitGradients], order: Sequence[str]) -> SplitGradients:
    """The per-task gradients of several micro-batches of one optimizer step, summed task by task
    (a task present in some micro-batches only gets what those gave), with the tasks in
    ``order`` (the run's). The weighting then combines the step's gradients once, as it would
    for one large batch: a method that normalises gradients or keeps moving averages would
    otherwise act ``grad_accum`` times per step."""
    if len(splits) == 1:
        return splits[0]
    first = splits[0]
    names = [n for n in order if any(n in s.task.names for s in splits)]
    matrix = first.task.matrix.new_zeros(len(names), first.task.matrix.shape[1])
    losses = torch.zeros(len(names), dtype=torch.float64)
    private: list[list[Tensor | None]] = [[None] * len(first.private) for _ in names]
    for split in splits:
        for i, name in enumerate(split.task.names):
            row = names.index(name)
            matrix[row] += split.task.matrix[i]
            losses[row] += split.task.losses[i]
            for j, g in enumerate(split.private_grads[i]):
                if g is not None:
                    private[row][j] = g if private[row][j] is None else private[row][j] + g
    task = TaskGradients(names, matrix, first.task.params, losses, first.task.last_shared)
    return SplitGradients(task, first.private, private)


def split_backward(task_losses: dict[str, TaskLoss], shared: Sequence[Tensor],
                   private: Sequence[Tensor], *, reduce: GradientReducer | None = None,
                   last_shared: Sequence[Tensor] | None = None,
                   is_finite: Callable[[Tensor], bool] | None = None) -> SplitGradients | None:
    """Run each task's forward (``task_losses[name]()``) and backward on its own graph.

    ``task_losses``: the present tasks, in run order, each a closure over its rows (returning
    None when none of them is labelled after all: the task is then left out).
    ``shared``: the parameters whose per-task gradients the weighting combines (the columns of
    the ``(k, P)`` matrix); ``private``: every other trainable parameter (each task's gradient on
    them is kept until :meth:`SplitGradients.apply`). ``reduce``: the weighting's
    ``gradient_reducer``, applied to the stacked matrix. ``is_finite``: checked on each loss
    before its backward (default ``torch.isfinite``); a non-finite loss returns None, and nothing
    is accumulated anywhere.
    """
    shared = [p for p in shared if p.requires_grad]
    private = [p for p in private if p.requires_grad]
    if not shared:
        raise ValueError("per-task gradients need at least one shared parameter")
    is_finite = is_finite or (lambda loss: bool(torch.isfinite(loss)))
    sizes = [p.numel() for p in shared]
    matrix = torch.empty(len(task_losses), sum(sizes), dtype=shared[0].dtype,
                         device=shared[0].device)   # every row is written below
    names: list[str] = []
    losses: list[float] = []
    private_grads: list[list[Tensor | None]] = []
    for name, task_loss in task_losses.items():
        loss = task_loss()
        if loss is None:    # no labelled row of this task after all: it contributes nothing
            continue
        if not is_finite(loss):
            return None
        params = [*shared, *private]
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        else:   # every parameter this task reaches is frozen: a zero gradient everywhere
            grads = (None,) * len(params)
        offset, row = 0, matrix[len(names)]
        for g, n in zip(grads, sizes):
            if g is None:    # a parameter this task does not reach
                row[offset:offset + n].zero_()
            else:
                row[offset:offset + n] = g.reshape(-1)
            offset += n
        names.append(name)
        losses.append(float(loss.detach()))
        private_grads.append(list(grads[len(shared):]))
    matrix = matrix[:len(names)]
    if reduce is not None:
        reduced = reduce(matrix)
        if not isinstance(reduced, Tensor) or reduced.shape != matrix.shape:
            raise ValueError(f"the gradient reducer must return a tensor of shape "
                             f"{tuple(matrix.shape)} (k tasks, P parameters), got "
                             f"{getattr(reduced, 'shape', type(reduced).__name__)}")
        matrix = reduced
    last = [p for p in last_shared if p.requires_grad] if last_shared is not None else None
    task = TaskGradients(names, matrix, shared, torch.tensor(losses, dtype=torch.float64), last)
    return SplitGradients(task, private, private_grads)


def conflicts(matrix: Tensor, names: Sequence[str]) -> dict[str, object]:
    """Gradient-conflict diagnostics of a ``(k, P)`` per-task gradient matrix: the pairwise
    cosine similarities (``cosine[i][j]``, tasks in ``names`` order; 0 against a zero gradient)
    and the fraction of task pairs whose gradients conflict (negative cosine)."""
    m = matrix.double()
    norms = m.norm(dim=1)
    gram = m @ m.T
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(m.dtype).tiny),
                         torch.zeros_like(gram))
    k = len(names)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    conflicting = sum(1 for i, j in pairs if cosine[i, j] < 0)
    return {"tasks": list(names), "cosine": [[round(float(c), 6) for c in row] for row in cosine],
            "conflict_fraction": conflicting / len(pairs) if pairs else 0.0,
            "grad_norm": [float(n) for n in norms]}
