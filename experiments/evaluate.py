"""Evaluation: predictions per task with its head, then the task's declared metric.

* ``lm`` head: greedy decoding with the KV cache, detokenised, compared as text;
* ``classifier`` head: argmax of the class logits, mapped to the label word;
* ``rank`` head: each label's verbalisation scored by the decoder, the most likely wins (T0).

Every metric is on a 0-100 scale; ``average`` is the unweighted mean over the evaluated tasks.
Evaluation uses each task's first template (fixed), as FLAN does.
"""
from __future__ import annotations

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
            limit: int, batch_size: int, max_source_len: int, max_target_len: int,
            max_new_tokens: int) -> tuple[list[str], list[str]]:
    """(predictions, references) as text for the first ``limit`` examples of ``split``."""
    spec = data.specs[task]
    pool = data.examples[task].get(split)
    if not pool:
        raise ValueError(f"task {task!r} has no {split!r} split; splits: {', '.join(data.examples[task])}")
    examples = [data.get(task, split, i) for i in range(min(limit, len(pool)))]
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


def evaluate(model: Any, data: TaskData, tokenizer: Tokenizer, split: str, *, limit: int,
             batch_size: int, max_source_len: int, max_target_len: int,
             max_new_tokens: int) -> dict[str, float]:
    """``{task: metric value, ..., "average": mean}`` over every task that has ``split``."""
    scores: dict[str, float] = {}
    for task, spec in data.specs.items():
        if split not in data.examples[task]:
            continue
        preds, refs = predict(model, data, tokenizer, task, split, limit=limit,
                              batch_size=batch_size, max_source_len=max_source_len,
                              max_target_len=max_target_len, max_new_tokens=max_new_tokens)
        scores[task] = compute_metrics(spec.metric_name, preds, refs, labels=spec.labels)
    if scores:
        scores["average"] = sum(scores.values()) / len(scores)
    return scores


def eval_options(cfg: RunConfig) -> dict[str, int]:
    """The keyword arguments of :func:`evaluate` a run config sets."""
    return dict(limit=cfg.data.eval_examples, batch_size=max(cfg.train.batch_size, 32),
                max_source_len=cfg.data.max_source_len, max_target_len=cfg.data.max_target_len,
                max_new_tokens=cfg.train.generation_max_tokens)
