"""TensorBoard logging of a run: the events of ``metrics.jsonl``, as scalars, beside it.

``train.tensorboard: true`` writes event files under ``RUN_DIR/tensorboard/`` with PyTorch's
``torch.utils.tensorboard.SummaryWriter`` (it needs the ``tensorboard`` package: ``pip install
'polytask[tensorboard]'``). ``metrics.jsonl`` stays the record of the run; TensorBoard gets a
copy of its numbers, written by the same calls (:func:`log_event`), so the two never disagree:

* ``train`` events: every numeric field, under ``train/`` (``train/loss``, ``train/loss/<task>``,
  ``train/weight/<task>``, ``train/lr``, ``train/tokens_per_s``, ...; ``finite`` as 0/1);
* ``eval`` events: the metrics under their split (``validation/<task>``, ``test/average_seen``);
* ``gradients`` events: ``gradients/conflict_fraction`` and ``gradients/grad_norm/<task>``;
* the run config, as JSON text, at step 0 of a fresh run.

Only rank 0 writes (the caller passes ``lead``). A resumed run appends to the same directory:
the writer's ``purge_step`` is the step after the checkpoint's, so TensorBoard hides whatever
the interrupted run logged past the checkpoint, exactly as ``metrics.jsonl`` is cut back to the
checkpoint (:func:`polytask.experiments.resume._rewind_metrics`); the checkpoint's own step was
logged before it was saved and is kept. Nothing here needs a network.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from polytask.experiments.config import RunConfig
from polytask.experiments.resume import _log

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'polytask[tensorboard]'"
#: fields of an event that are bookkeeping, not measurements
NOT_SCALARS = ("event", "step", "split")


def open_writer(cfg: RunConfig, run_dir: Path, lead: bool, step: int) -> Any | None:
    """A ``SummaryWriter`` on ``run_dir/tensorboard`` when ``train.tensorboard`` is on and this
    is rank 0; else None. ``step``: the step the run starts from (0 when fresh), after which
    earlier-logged events are purged. A missing ``tensorboard`` package is one ``ValueError``."""
    if not cfg.train.tensorboard or not lead:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # torch's module imports the tensorboard package and fails without it
        raise ValueError(f"train.tensorboard = true needs the tensorboard package, which is not "
                         f"installed: {INSTALL_HINT} (or set train.tensorboard=false)") from None
    writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                           purge_step=step + 1 if step > 0 else None)
    if step == 0:
        text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
        # four-space indentation: TensorBoard renders text as markdown, this keeps it verbatim
        writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
    return writer


@contextmanager
def tensorboard_writer(cfg: RunConfig, run_dir: Path, lead: bool, step: int
                       ) -> Iterator[Any | None]:
    """:func:`open_writer` for the length of a ``with`` block, closed (flushed) however it
    ends, so an interrupted run keeps what it logged."""
    writer = open_writer(cfg, run_dir, lead, step)
    try:
        yield writer
    finally:
        if writer is not None:
            writer.close()


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """``{tag: value}`` TensorBoard gets for one ``metrics.jsonl`` record (module doc); empty
    for events it does not track (``resume``)."""
    kind = record.get("event")
    if kind == "train":
        prefix = "train"
    elif kind == "eval":
        prefix = str(record.get("split", "eval"))
    elif kind == "gradients":
        prefix = "gradients"
        norms = record.get("grad_norm")
        if isinstance(norms, list) and len(norms) == len(record.get("tasks", [])):
            extra = {f"gradients/grad_norm/{t}": float(n)
                     for t, n in zip(record["tasks"], norms) if _numeric(n)}
            return {**extra, **_numbers(record, prefix)}
    else:
        return {}
    return _numbers(record, prefix)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float))   # bool is an int: finite logs as 0/1


def _numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in NOT_SCALARS and _numeric(v)}


def track(writer: Any | None, record: dict[str, Any]) -> None:
    """Write ``record``'s scalars (:func:`scalars`) at its ``step``; nothing without a writer."""
    if writer is None:
        return
    for tag, value in scalars(record).items():
        writer.add_scalar(tag, value, global_step=record["step"])


def log_event(writer: Any | None, path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``metrics.jsonl`` at ``path``, and give it to TensorBoard."""
    _log(path, record)
    track(writer, record)
