"""Evaluation: predictions per task with its head, then the task's declared metric.

* ``lm`` head: greedy decoding with the KV cache, detokenised, compared as text;
* ``classifier`` head: argmax of the class logits, mapped to the label word;
* ``rank`` head: each label's verbalisation scored by the decoder, the most likely wins (T0).

Every metric is on a 0-100 scale. Held-out tasks (``TaskSpec.held_out``, FLAN's zero-shot
protocol) are scored but kept apart: ``average_seen`` is the unweighted mean over the trained
tasks, ``average_held_out`` over the held-out ones (a key is omitted when it has no task). Only
seen tasks may select checkpoints (:func:`check_selection_metric`), and a held-out task must be
scored through trained parameters (:func:`check_held_out_columns`). ``average`` is kept for
runs without held-out tasks only (there it equals ``average_seen``; older configs and reports
use it); with held-out tasks it is omitted, so nothing mixes the two.
Evaluation uses each task's first template (fixed), as FLAN does.
"""
from __future__ import annotations

from statistics import mean
from typing import Any

import torch

from polytask.core.data.collate import CollateReport, collate
from polytask.core.data.task_data import TaskData
from polytask.core.decoding.generation import generate
from polytask.core.metrics import compute_metrics
from polytask.core.data.tokenizer import Tokenizer
from polytask.experiments.config import RunConfig


@torch.no_grad()
def predict(model: Any, data: TaskData, tokenizer: Tokenizer, task: str, split: str, *,
            limit: int | None, batch_size: int, max_source_len: int, max_target_len: int,
            max_new_tokens: int) -> tuple[list[str], list[str]]:
    """(predictions, references) as text for the first ``limit`` examples of ``split`` (None:
    every example)."""
    spec = data.specs[task]
    pool = data.examples[task].get(split)
    if not pool:
        raise ValueError(f"task {task!r} has no {split!r} split; splits: {', '.join(data.examples[task])}")
    examples = [data.get(task, split, i) for i in range(scored_count(len(pool), limit))]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[str] = []
    report = CollateReport()  # evaluation truncates long inputs rather than dropping rows
    head = spec.head_kind
    candidates = [tokenizer.encode(label) for label in spec.labels] if spec.labels else None
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate(chunk, tokenizer, data.task_index, max_source_len=max_source_len,
                        max_target_len=max_target_len, truncation="truncate",
                        report=report).to(device)
        if head == "classifier":
            out = model(batch).tasks[task]
            preds += [spec.labels[i] for i in out.logits.argmax(-1).tolist()]
        elif head == "rank":
            # the task's own RankHead: its configured normalisation (sharing.rank_normalize)
            choice = model.predict_class(task, batch.src, batch.src_mask, candidates)
            preds += [spec.labels[i] for i in choice.tolist()]
        else:
            ids = generate(model.for_task(task), batch.src, batch.src_mask,
                           max_new_tokens=max_new_tokens, bos_id=tokenizer.bos_id,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
            preds += tokenizer.decode_batch(ids.tolist())
    model.train(was_training)
    return preds, [ex.target for ex in examples]


def evaluate(model: Any, data: TaskData, tokenizer: Tokenizer, split: str, *,
             limit: int | None, batch_size: int, max_source_len: int, max_target_len: int,
             max_new_tokens: int) -> dict[str, float]:
    """``{task: metric value, ..., "average_seen": mean, "average_held_out": mean}`` over every
    task that has ``split`` (see the module doc for ``average``). A split no task has raises,
    naming the splits the run's tasks have."""
    tasks = [t for t in data.specs if split in data.examples[t]]
    if not tasks:
        raise ValueError(f"no task of this run has a {split!r} split; splits: "
                         f"{', '.join(run_splits(data))}")
    scores: dict[str, float] = {}
    for task in tasks:
        spec = data.specs[task]
        preds, refs = predict(model, data, tokenizer, task, split, limit=limit,
                              batch_size=batch_size, max_source_len=max_source_len,
                              max_target_len=max_target_len, max_new_tokens=max_new_tokens)
        scores[task] = compute_metrics(spec.metric_name, preds, refs, labels=spec.labels)
    return {**scores, **averages(scores, data)}


def averages(scores: dict[str, float], data: TaskData) -> dict[str, float]:
    """The means over the seen and the held-out tasks among ``scores`` (empty groups omitted),
    and the legacy ``average`` when the run has no held-out task."""
    seen = [v for t, v in scores.items() if not data.specs[t].held_out]
    held = [v for t, v in scores.items() if data.specs[t].held_out]
    out: dict[str, float] = {}
    if seen:
        out["average_seen"] = mean(seen)
    if held:
        out["average_held_out"] = mean(held)
    if seen and not data.held_out_tasks:
        out["average"] = out["average_seen"]
    return out


def run_splits(data: TaskData) -> list[str]:
    """Every split some task of the run has, in first-seen order."""
    return list(dict.fromkeys(sp for splits in data.examples.values() for sp in splits))


def scored_count(pool: int, limit: int | None) -> int:
    return pool if limit is None else min(limit, pool)


def scored_examples(data: TaskData, split: str, limit: int | None) -> dict[str, int]:
    """``{task: number of examples evaluate() scores}`` on ``split`` with ``limit``."""
    return {t: scored_count(len(ex[split]), limit) for t, ex in data.examples.items() if split in ex}


def selection_metrics(data: TaskData) -> list[str]:
    """What may select checkpoints (``train.early_stopping_metric``): seen tasks only."""
    legacy = [] if data.held_out_tasks else ["average"]
    return ["average_seen", *legacy, *data.train_tasks]


def check_selection_metric(metric: str, data: TaskData) -> None:
    """Refuse a checkpoint-selection metric that held-out tasks would influence."""
    allowed = selection_metrics(data)
    if metric in allowed:
        return
    if metric == "average_held_out" or metric in data.held_out_tasks:
        why = "held-out tasks are evaluated zero-shot and never select checkpoints"
    elif metric == "average":
        why = (f"'average' would mix seen and held-out tasks "
               f"({', '.join(data.held_out_tasks)} held out)")
    else:
        why = "it is not evaluated"
    raise ValueError(f"train.early_stopping_metric = {metric!r} is refused: {why}; choose one "
                     f"of {', '.join(allowed)}")


def check_held_out_columns(model: Any, data: TaskData, strategy: str) -> None:
    """Refuse a held-out task that would be scored through parameters no trained task uses
    (``sharing.strategy`` none or soft give every task a private column: a held-out task's
    would keep its initial weights). ``model``: a :class:`polytask.heads.model.MultiTaskModel`."""
    trained = {id(p) for t in data.train_tasks for p in model.parameters_of(t)}
    names = {id(p): n for n, p in model.named_parameters()}
    for task in data.held_out_tasks:
        untrained = [names.get(id(p), "?") for p in model.parameters_of(task)
                     if id(p) not in trained]
        if untrained:
            raise ValueError(
                f"held-out task {task!r} would be scored on {len(untrained)} parameter "
                f"tensor(s) no trained task updates (e.g. {untrained[0]}): sharing.strategy = "
                f"{strategy!r} gives it layers of its own that never train; use a strategy "
                f"that shares its layers with the trained tasks (e.g. 'hard') or train it")


def eval_limit(cfg: RunConfig, split: str) -> int | None:
    """Examples per task scored on ``split``: the final test scores every example unless
    ``data.test_examples`` caps it; other splits (periodic validation) ``data.eval_examples``."""
    return cfg.data.test_examples if split == "test" else cfg.data.eval_examples


def eval_options(cfg: RunConfig, split: str = "test") -> dict[str, Any]:
    """The keyword arguments of :func:`evaluate` a run config sets for ``split``."""
    return dict(limit=eval_limit(cfg, split), batch_size=max(cfg.train.batch_size, 32),
                max_source_len=cfg.data.max_source_len, max_target_len=cfg.data.max_target_len,
                max_new_tokens=cfg.train.generation_max_tokens)
