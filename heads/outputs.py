"""What the multi-task model returns: :class:`TaskOutput` per task and :class:`MultiTaskOutput`
per batch; and :class:`NotRun`, the placeholder for a slot module no task of its group runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polytask.core.model.transformer import EncoderDecoder


class NotRun(nn.Module):
    """Stands in, in a task's view, for a slot module that no task of its group runs — the
    decoder layers and LM head of classifier tasks — so nothing is built that is never trained."""

    def __init__(self, slot: str, tasks: list[str]) -> None:
        super().__init__()
        self.slot, self.tasks = slot, tasks

    def forward(self, *args, **kwargs):
        raise ValueError(f"slot {self.slot} is not built for task(s) {', '.join(self.tasks)}: "
                         "a classifier head reads the encoder and runs no decoder")

    def extra_repr(self) -> str:
        return f"slot={self.slot}, tasks={self.tasks}"


class TaskOutput:
    """The model's output for the rows of one task.

    rows: ``(n,)`` long, indices of the task's rows in the batch.
    logits: ``(n, C)`` for a classifier head, ``(n, t, V)`` for an lm / rank head.
    head: the task's head kind (``lm``, ``classifier``, ``rank``).
    hidden, lm: for an lm / rank head, the final decoder states ``(n, t, d)`` and the task's
        EncoderDecoder view whose LM head maps them to vocabulary scores. ``logits`` is then
        computed from them on first use, so a loss that works from the hidden states
        (:meth:`losses.GenerativeLoss.from_hidden`) never materialises the ``(n, t, V)`` tensor.
    """

    def __init__(self, rows: torch.Tensor, logits: torch.Tensor | None = None, head: str = "lm",
                 *, hidden: torch.Tensor | None = None, lm: EncoderDecoder | None = None) -> None:
        if logits is None and (hidden is None or lm is None):
            raise ValueError("TaskOutput needs logits, or hidden states and the lm that scores them")
        self.rows, self.head, self.hidden, self.lm = rows, head, hidden, lm
        self._logits = logits

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.lm.logits(self.hidden)
        return self._logits

    def __repr__(self) -> str:
        shape = tuple(self._logits.shape) if self._logits is not None else "lazy"
        return f"TaskOutput(head={self.head!r}, rows={len(self.rows)}, logits={shape})"


@dataclass
class MultiTaskOutput:
    """``tasks``: task name -> :class:`TaskOutput` (tasks without rows are absent).

    ``shared`` ``(b, s, d)``: encoder states after the last encoder slot shared by all tasks
    (None if there is none); ``private`` ``(b, s, d)``: the encoder output when the top of the
    encoder is not shared by all (None otherwise); ``task_logits`` ``(b, k)``: the adversarial
    discriminator's prediction from ``shared`` (None without one); ``src_mask`` ``(b, s)``.
    """

    tasks: dict[str, TaskOutput]
    src_mask: torch.Tensor
    task_ids: torch.Tensor
    shared: torch.Tensor | None = None
    private: torch.Tensor | None = None
    task_logits: torch.Tensor | None = None
