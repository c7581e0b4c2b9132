"""Data-parallel training with ``torchrun`` and ``torch.distributed`` (gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node=2 -m polytask.experiments.cli train CONFIG

Every rank holds the whole model; the mixture sampler gives rank ``r`` of ``N`` rows
``r, r + N, ...`` of the global batch, so ``N`` ranks see exactly the rows one process sees.

Why not ``DistributedDataParallel``: gradient-manipulating weightings (PCGrad, GradNorm) need
per-task gradients of the *global* batch before their surgery, which DDP's single fused
all-reduce after ``backward`` cannot give. So polytask reduces explicitly:

1. Each task loss is made *global in value, local in gradient*:
   ``L = L_local · (n_local · N / n_global) + stop_grad(L_global − that)``, where ``n`` counts
   the units the loss averages over (label tokens, labelled rows). Its value is the loss of the
   global batch on every rank (so loss-based weightings — uncertainty, DWA, FAMO, GradNorm's
   ratios — compute identical weights everywhere) and the mean over ranks of its gradient is
   the gradient of the global loss.
2. Per-task gradient vectors are averaged across ranks inside
   :func:`polytask.losses.weighting.task_gradients` (the one place they are formed), before PCGrad
   projects or GradNorm takes norms.
3. After the weighted backward, every trainable parameter's gradient is averaged across ranks
   (one flat all-reduce over the parameters any rank reached; a rank that did not reach one
   contributes zeros). Gradients that step 2 already made identical are unchanged by it.

The result equals a single process with the same global batch (tested: 2 CPU ranks vs 1
process). Only rank 0 trains the tokenizer, evaluates, logs and writes checkpoints.

FSDP (``torch.distributed.fsdp.fully_shard``) is not wired in: its sharded parameters do not
fit the per-task gradient surgery above, and at the model sizes polytask targets every rank
holds the model easily. Use DDP-style training as above.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from polytask.core.data.batch import IGNORE_INDEX, Batch


def setup(device: str) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes; ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_true(flag: bool) -> bool:
    """Logical AND over ranks (so every rank takes the same branch)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def average(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of ``t`` (a new tensor; used by ``task_gradients``)."""
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def loss_units(output: Any, batch: Batch, reduction: str) -> float:
    """How many units a task's loss averages over in this rank's batch: labelled rows for a
    classifier, label tokens (or labelled sequences for ``reduction="sequence"``) otherwise.
    A ``ce`` loss with class weights averages by the weights' sum instead, so under data
    parallelism its global value is approximate (a user loss averaging otherwise likewise)."""
    if output.head == "classifier":
        return float((batch.class_ids[output.rows] != IGNORE_INDEX).sum())
    labels = batch.labels[output.rows] != IGNORE_INDEX
    return float(labels.any(dim=1).sum() if reduction == "sequence" else labels.sum())


def globalize(task_losses: dict[str, torch.Tensor], units: dict[str, float], names: list[str],
              anchor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Global-value, local-gradient task losses (module docstring, step 1), for every task
    present on any rank. ``anchor`` is a zero connected to the graph, for tasks absent here."""
    world = dist.get_world_size()
    stats = torch.zeros(2, len(names), dtype=torch.float64)
    for i, n in enumerate(names):
        if n in task_losses:
            stats[0, i] = float(task_losses[n].detach()) * units[n]
            stats[1, i] = units[n]
    dist.all_reduce(stats)
    out = {}
    for i, n in enumerate(names):
        if stats[1, i] == 0:
            continue
        value = float(stats[0, i] / stats[1, i])
        local = task_losses[n] * (units[n] * world / float(stats[1, i])) if n in task_losses else anchor
        out[n] = local + (value - local).detach()
    return out


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce (module docstring, step 3).

    A parameter no rank produced a gradient for keeps ``grad = None`` (as in one process, where
    the optimiser then leaves it alone — no weight decay either); one that only some ranks
    reached gets zeros from the others.
    """
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in live])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in live:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
