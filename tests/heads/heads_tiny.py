"""Tiny models and mixed batches for the heads tests (d_model 16, 2 layers, dropout 0).

Imported by the test files as `heads_tiny` (pytest puts this directory on sys.path)."""
from __future__ import annotations

import torch

from polytask.core.data.batch import IGNORE_INDEX, Batch
from polytask.core.model.config import ModelConfig
from polytask.core.data.tasks import TaskSpec

VOCAB = 40


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=16, n_heads=2, n_encoder_layers=2, n_decoder_layers=2,
                d_ff=32, dropout=0.0, max_length=32)
    base.update(overrides)
    return ModelConfig(**base)


def three_tasks() -> list[TaskSpec]:
    """A generation task, a classifier task and a rank-head task (groups from their kinds)."""
    return [TaskSpec("gen"),
            TaskSpec("cls", kind="classification", labels=["neg", "pos", "neu"]),
            TaskSpec("rnk", kind="classification", labels=["yes", "no"], head="rank",
                     group="generation")]


def make_batch(task_ids: list[int], n_classes: list[int] | None = None, s: int = 7, t: int = 5,
               seed: int = 1) -> Batch:
    """Random ids with right padding of varying length; every row labelled."""
    g = torch.Generator().manual_seed(seed)
    b = len(task_ids)
    src = torch.randint(4, VOCAB, (b, s), generator=g)
    src_len = torch.randint(2, s + 1, (b,), generator=g)
    src_mask = torch.arange(s)[None] < src_len[:, None]
    src = src.masked_fill(~src_mask, 0)
    tgt = torch.randint(4, VOCAB, (b, t), generator=g)
    tgt_len = torch.randint(1, t + 1, (b,), generator=g)
    tgt_mask = torch.arange(t)[None] < tgt_len[:, None]
    tgt_in = torch.cat([torch.full((b, 1), 2), tgt[:, :-1]], 1).masked_fill(~tgt_mask, 0)
    labels = tgt.masked_fill(~tgt_mask, IGNORE_INDEX)
    n_classes = n_classes or [3] * 8
    class_ids = torch.tensor([int(torch.randint(0, n_classes[k], (1,), generator=g))
                              for k in task_ids])
    return Batch(torch.tensor(task_ids), src, src_mask, tgt_in, tgt_mask, labels, class_ids)


