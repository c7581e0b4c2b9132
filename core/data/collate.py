"""Collation: formatted examples -> one padded ``Batch`` (teacher forcing for the decoder).

For a target with ids ``y`` the decoder sees ``tgt_in = [bos] + y`` and learns
``labels = y + [eos]`` (shifted right, as in Vaswani et al. 2017 and T5). Padding uses
``pad_id`` in the inputs and ``IGNORE_INDEX`` in the labels, so padding costs no loss.

Too-long rows are handled by ``truncation``:
    truncate  cut the source to ``max_source_len`` and the decoder sequences to
              ``max_target_len`` (a cut target loses its eos: the model is never taught to
              stop at a false end);
    error     raise ``ValueError`` naming the task and the example's file and line;
    drop      leave the row out of the batch.
Nothing happens silently: every cut or dropped row is counted in a :class:`CollateReport`
(pass one to accumulate over a run), and without a report a warning is issued.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from polytask.core.data.batch import IGNORE_INDEX, Batch
from polytask.core.data.task_data import Example
from polytask.core.data.tokenizer import TextTokenizer

Truncation = Literal["truncate", "error", "drop"]


@dataclass
class CollateReport:
    """Counts of rows that did not fit, per task; ``dropped_examples`` says which."""

    truncated_source: dict[str, int] = field(default_factory=dict)
    truncated_target: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: list[str] = field(default_factory=list)

    def add(self, counter: dict[str, int], task: str) -> None:
        counter[task] = counter.get(task, 0) + 1

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in (self.truncated_source, self.truncated_target, self.dropped))


def _describe(row: Example) -> str:
    where = f" ({row.meta['file']}:{row.meta['line']})" if "file" in row.meta else ""
    return f"example of task {row.task!r}{where}"


def _pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(rows: Sequence[Example], tokenizer: TextTokenizer, task_index: dict[str, int], *,
            max_source_len: int, max_target_len: int, truncation: Truncation = "truncate",
            report: CollateReport | None = None) -> Batch:
    """Tokenize and pad ``rows`` into a ``Batch`` (shapes in :class:`polytask.core.data.batch.Batch`).

    Args:
        rows: formatted examples, possibly of several tasks.
        tokenizer: sources through ``encode_source_batch``, targets through
            ``encode_batch``; ``pad_id`` / ``bos_id`` / ``eos_id``.
        task_index: task name -> ``Batch.task_ids`` value.
        max_source_len: most source tokens per row.
        max_target_len: most decoder positions per row (target tokens + 1).
        truncation: ``truncate`` | ``error`` | ``drop`` (module docstring).
        report: accumulates what was cut or dropped.
    """
    if truncation not in ("truncate", "error", "drop"):
        raise ValueError(f"unknown truncation {truncation!r}; choose truncate, error or drop")
    if max_source_len <= 0 or max_target_len <= 1:
        raise ValueError(f"max_source_len ({max_source_len}) must be > 0 and max_target_len "
                         f"({max_target_len}) > 1")
    if not rows:
        raise ValueError("collate needs at least one row")
    missing = sorted({r.task for r in rows} - set(task_index))
    if missing:
        raise ValueError(f"task {missing[0]!r} is not in task_index ({', '.join(task_index)})")
    local = report if report is not None else CollateReport()
    before = local.total
    sources, targets = tokenizer.encode_source_batch([r.source for r in rows]), tokenizer.encode_batch([r.target for r in rows])
    kept, src, dec_in, dec_out = [], [], [], []
    for row, s, y in zip(rows, sources, targets):
        long_src, long_tgt = len(s) > max_source_len, len(y) + 1 > max_target_len
        if long_src or long_tgt:
            what = (f"source has {len(s)} tokens > max_source_len {max_source_len}" if long_src else
                    f"target has {len(y) + 1} positions > max_target_len {max_target_len}")
            if truncation == "error":
                raise ValueError(f"{_describe(row)}: {what}")
            if truncation == "drop":
                local.add(local.dropped, row.task)
                local.dropped_examples.append(f"{_describe(row)}: {what}")
                continue
            if long_src:
                local.add(local.truncated_source, row.task)
            if long_tgt:
                local.add(local.truncated_target, row.task)
        kept.append(row)
        src.append(s[:max_source_len])
        dec_in.append(([tokenizer.bos_id] + y)[:max_target_len])
        dec_out.append((y + [tokenizer.eos_id])[:max_target_len])
    if report is None and local.total > before:
        warnings.warn(f"collate: {local.total - before} of {len(rows)} rows did not fit "
                      f"(truncation={truncation!r}): {local}", stacklevel=2)
    if not kept:
        raise ValueError(f"every row of the batch was dropped: {local.dropped_examples}")
    src_ids, tgt_in = _pad(src, tokenizer.pad_id), _pad(dec_in, tokenizer.pad_id)
    labels = _pad(dec_out, IGNORE_INDEX)
    class_ids = [r.label if r.label is not None else IGNORE_INDEX for r in kept]
    return Batch(
        task_ids=torch.tensor([task_index[r.task] for r in kept], dtype=torch.long),
        src=src_ids, src_mask=_pad(src, -1) != -1,
        tgt_in=tgt_in, tgt_mask=_pad(dec_in, -1) != -1,
        labels=labels, class_ids=torch.tensor(class_ids, dtype=torch.long))


def length_buckets(lengths: Sequence[int], batch_size: int, *, pool: int = 50,
                   seed: int = 0) -> list[list[int]]:
    """Group indices of similar length into batches to cut padding.

    Indices are shuffled, cut into pools of ``pool * batch_size``, sorted by length inside each
    pool and split into batches; the batch order is shuffled again so lengths do not rise
    through an epoch (the "bucketing" of Sutskever et al. 2014 / fairseq's sorted batches).
    Every index appears exactly once; the last batch may be smaller.
    """
    if batch_size <= 0 or pool <= 0:
        raise ValueError(f"batch_size ({batch_size}) and pool ({pool}) must be positive")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), pool * batch_size):
        chunk = sorted(order[start:start + pool * batch_size], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
