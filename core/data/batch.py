"""``Batch``: the one structure that flows from the collator to the model and the losses.

Rows of a batch may belong to different tasks (``task_ids``). Shapes: b batch, s source
length, t target length.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100  # label value that contributes no loss and no gradient


@dataclass
class Batch:
    """Fields:
        task_ids: ``(b,)`` long, index into the run's task list.
        src: ``(b, s)`` long source ids (instruction-formatted input), padded with pad_id.
        src_mask: ``(b, s)`` bool, True = real token.
        tgt_in: ``(b, t)`` long decoder input (bos + target without its last token).
        tgt_mask: ``(b, t)`` bool, True = real decoder-input token.
        labels: ``(b, t)`` long next-token targets (target + eos); IGNORE_INDEX at padding and
            for rows without a text target.
        class_ids: ``(b,)`` long class index for classification rows; IGNORE_INDEX when the
            row is not a classification row or its label is missing (partial labels).
    """

    task_ids: torch.Tensor
    src: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    tgt_mask: torch.Tensor
    labels: torch.Tensor
    class_ids: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, rows: torch.Tensor) -> "Batch":
        """The sub-batch of the given row indices (or boolean row mask)."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def trimmed(self) -> "Batch":
        """The same rows without the trailing columns that are padding in every row (a sub-batch
        of one task is often shorter than the mixed batch it came from). Padding is on the right
        and masked everywhere, so the model computes the same values on the real tokens."""
        def width(*masks: torch.Tensor) -> int:
            used = torch.stack([m.any(dim=0) for m in masks]).any(dim=0).nonzero()
            return int(used.max()) + 1 if len(used) else 1
        s = width(self.src_mask)
        t = width(self.tgt_mask, self.labels != IGNORE_INDEX)
        return replace(self, src=self.src[:, :s], src_mask=self.src_mask[:, :s],
                       tgt_in=self.tgt_in[:, :t], tgt_mask=self.tgt_mask[:, :t],
                       labels=self.labels[:, :t])

    def __len__(self) -> int:
        return self.src.shape[0]

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())
