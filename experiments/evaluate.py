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
Templates and shots (FLAN, Wei et al. 2022; T0, Sanh et al. 2022): a task's main score uses its
first template (fixed, as FLAN does), so periodic validation and checkpoint selection stay cheap
and comparable. The final test may also score every template (``data.eval_templates: all``;
default ``first``, since k templates cost k times the test) and reports mean/min/max per task in
``summary.json`` under ``templates``. ``data.eval_shots = k`` prepends k demonstrations from the
task's train split (:func:`eval_examples`: seeded by ``train.seed`` and the example index, never
the scored example, rendered with the same template, dropped from the front until the source
fits ``data.max_source_len``) at the final test and ``polytask eval``; validation stays
zero-shot. Held-out tasks have no loaded train split, so they stay zero-shot.

Per example (:func:`example_scores`): the final test writes ``predictions.jsonl``
(:func:`write_predictions`), one line per scored example and template, with the metric's value
for that example where the task's metric is a mean over examples (accuracy and exact match:
0 or 100; ROUGE-L: the example's F-measure), so the mean of a task's first-template scores is
its test score. Corpus-level metrics (macro-F1, BLEU, chrF) have no per-example value: their
lines carry the prediction and a null score.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from polytask.core.data.collate import CollateReport, collate
from polytask.core.data.task_data import Example, TaskData, render
from polytask.core.data.tasks import TaskSpec
from polytask.core.decoding.generation import generate
from polytask.core.metrics import compute_metrics
from polytask.core.training.manifest import atomic_write
from polytask.core.data.tokenizer import Tokenizer
from polytask.experiments.config import RunConfig


TEMPLATE_MODES = ("first", "all")
DEMO_FORMAT = "{source} => {target}"   # one demonstration, "input => output" (GPT-3 / FLAN style)
PREDICTIONS = "predictions.jsonl"        # a run's per-example test predictions (module doc)
#: metrics whose corpus value is the mean of their value on each example alone
PER_EXAMPLE_METRICS = ("accuracy", "exact_match", "rouge_l")


@dataclass
class Evaluation:
    """What :func:`evaluate_details` measured on one split.

    Fields:
        scores: ``{task: value, ..., averages}``, the first template's (:func:`evaluate`).
        templates: ``{task: {"mean", "min", "max", "per_template"}}`` over the templates
            scored (``per_template[0]`` is the main score).
        demonstrations: ``{task: mean demonstrations used per example}`` (first template).
        predictions: one record per scored example and template (:func:`prediction_records`).
    """

    scores: dict[str, float]
    templates: dict[str, dict[str, Any]]
    demonstrations: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def template_count(spec: TaskSpec) -> int:
    """Templates a task is scored with: its own, or one (its records' instruction)."""
    return max(1, len(spec.templates))


def templated(example: Example, spec: TaskSpec, template: int) -> Example:
    """``example`` rendered with ``spec.templates[template]``; without templates, as it is.
    Template 0 is :func:`polytask.core.data.task_data.apply_template`'s evaluation choice."""
    if not spec.templates:
        return example
    text = render(spec.templates[template], example.meta.get("input", ""), spec.labels)
    return replace(example, source=text)


def _content(example: Example) -> tuple[str, str]:
    return example.meta.get("input", example.source), example.target


def demonstration_indices(data: TaskData, task: str, split: str, index: int, shots: int,
                          seed: int) -> list[int]:
    """Up to ``shots`` indices into ``task``'s train split, the demonstrations for example
    ``index`` of ``split``: drawn by an rng seeded with (seed, task, split, index), so the same
    on every run and template; never the scored example (the same train index, or the same
    input and target). Held-out tasks draw from their own training split, which is never
    trained on (:meth:`TaskData.demonstrations`); a task without one gets none."""
    pool = data.demonstrations(task)
    if shots == 0 or not pool:
        return []
    scored = data.examples[task][split][index]
    rng = random.Random(f"{seed}/{task}/{split}/{index}")   # str seeds are stable across runs

    def usable(j: int) -> bool:
        return not (split == "train" and j == index) and _content(pool[j]) != _content(scored)

    order = rng.sample(range(len(pool)), min(len(pool), shots + 8))
    picked = [j for j in order if usable(j)][:shots]
    if len(picked) < shots and len(order) < len(pool):   # many copies of the scored example
        seen = set(order)
        rest = [j for j in range(len(pool)) if j not in seen and usable(j)]
        picked += rng.sample(rest, min(len(rest), shots - len(picked)))
    return picked


def few_shot_source(demos: list[Example], scored: Example) -> str:
    """The demonstrations, then the scored example's source; just that without demos."""
    return " ".join([DEMO_FORMAT.format(source=d.source, target=d.target) for d in demos]
                    + [scored.source])


def with_demonstrations(scored: Example, demos: list[Example], tokenizer: Tokenizer,
                        max_source_len: int) -> tuple[Example, int]:
    """(``scored`` with ``demos`` prepended, demonstrations kept): demonstrations are dropped
    from the front until the tokenized source fits ``max_source_len`` (the scored example
    itself is truncated by the collator, as without demonstrations)."""
    demos = list(demos)
    while demos and len(tokenizer.encode_source(few_shot_source(demos, scored))) > max_source_len:
        demos.pop(0)
    return replace(scored, source=few_shot_source(demos, scored)), len(demos)


def eval_examples(data: TaskData, tokenizer: Tokenizer, task: str, split: str, *,
                  limit: int | None, max_source_len: int, template: int = 0, shots: int = 0,
                  seed: int = 0) -> tuple[list[Example], list[int]]:
    """(the first ``limit`` examples of ``split`` as scored, demonstrations used per example):
    rendered with ``template``, each demonstration with the same template."""
    spec = data.specs[task]
    pool = data.examples[task].get(split)
    if not pool:
        raise ValueError(f"task {task!r} has no {split!r} split; splits: {', '.join(data.examples[task])}")
    train = data.demonstrations(task)
    examples: list[Example] = []
    used: list[int] = []
    for i in range(scored_count(len(pool), limit)):
        demos = [templated(train[j], spec, template)
                 for j in demonstration_indices(data, task, split, i, shots, seed)]
        example, n = with_demonstrations(templated(pool[i], spec, template), demos, tokenizer,
                                         max_source_len)
        examples.append(example)
        used.append(n)
    return examples, used


@torch.no_grad()
def predict_examples(model: Any, data: TaskData, tokenizer: Tokenizer, task: str,
                     examples: list[Example], *, batch_size: int, max_source_len: int,
                     max_target_len: int, max_new_tokens: int) -> list[str]:
    """The model's prediction, as text, for each of ``examples`` (of ``task``)."""
    spec = data.specs[task]
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
    return preds


def predict(model: Any, data: TaskData, tokenizer: Tokenizer, task: str, split: str, *,
            limit: int | None, batch_size: int, max_source_len: int, max_target_len: int,
            max_new_tokens: int, template: int = 0, shots: int = 0, seed: int = 0
            ) -> tuple[list[str], list[str]]:
    """(predictions, references) as text for the first ``limit`` examples of ``split`` (None:
    every example), rendered with ``template`` and ``shots`` demonstrations
    (:func:`eval_examples`)."""
    examples, _ = eval_examples(data, tokenizer, task, split, limit=limit,
                                max_source_len=max_source_len, template=template, shots=shots,
                                seed=seed)
    preds = predict_examples(model, data, tokenizer, task, examples, batch_size=batch_size,
                             max_source_len=max_source_len, max_target_len=max_target_len,
                             max_new_tokens=max_new_tokens)
    return preds, [ex.target for ex in examples]


def evaluate_details(model: Any, data: TaskData, tokenizer: Tokenizer, split: str, *,
                     templates: str = "first", limit: int | None, batch_size: int,
                     max_source_len: int, max_target_len: int, max_new_tokens: int,
                     shots: int = 0, seed: int = 0) -> Evaluation:
    """Every task that has ``split``, scored with its first template (``templates="first"``)
    or each of its templates (``"all"``, T0's robustness measure, Sanh et al. 2022), with
    ``shots`` training demonstrations per example. The main scores stay the first template's.
    A split no task has raises, naming the splits the run's tasks have."""
    if templates not in TEMPLATE_MODES:
        raise ValueError(f"templates = {templates!r}; choose one of {', '.join(TEMPLATE_MODES)}")
    tasks = [t for t in data.specs if split in data.examples[t]]
    if not tasks:
        raise ValueError(f"no task of this run has a {split!r} split; splits: "
                         f"{', '.join(run_splits(data))}")
    opts = dict(batch_size=batch_size, max_source_len=max_source_len,
                max_target_len=max_target_len, max_new_tokens=max_new_tokens)
    per_template: dict[str, list[float]] = {}
    demonstrations: dict[str, float] = {}
    records: list[dict[str, Any]] = []
    for task in tasks:
        spec = data.specs[task]
        count = template_count(spec) if templates == "all" else 1
        per_template[task] = []
        for template in range(count):
            examples, used = eval_examples(data, tokenizer, task, split, limit=limit,
                                           max_source_len=max_source_len, template=template,
                                           shots=shots, seed=seed)
            preds = predict_examples(model, data, tokenizer, task, examples, **opts)
            per_template[task].append(compute_metrics(
                spec.metric_name, preds, [ex.target for ex in examples], labels=spec.labels))
            records += prediction_records(spec, template, examples, preds)
            if template == 0:
                demonstrations[task] = float(mean(used)) if used else 0.0
    scores = {t: values[0] for t, values in per_template.items()}
    summary = {t: {"mean": mean(v), "min": min(v), "max": max(v), "per_template": v}
               for t, v in per_template.items()}
    return Evaluation({**scores, **averages(scores, data)}, summary, demonstrations, records)


def example_scores(metric_name: str, predictions: list[str], references: list[str]
                   ) -> list[float | None]:
    """Each example's value of the metric (0-100), for :data:`PER_EXAMPLE_METRICS`: the metric
    of that example alone, whose mean over the examples is the corpus value; None for each
    example of a corpus-level metric (macro-F1, BLEU, chrF), which has no per-example value."""
    if metric_name not in PER_EXAMPLE_METRICS:
        return [None] * len(predictions)
    return [compute_metrics(metric_name, [p], [r]) for p, r in zip(predictions, references)]


def prediction_records(spec: TaskSpec, template: int, examples: list[Example],
                       predictions: list[str]) -> list[dict[str, Any]]:
    """One ``predictions.jsonl`` record per example: task, template index, source as scored
    (template and demonstrations applied), reference, prediction, metric and per-example score
    (:func:`example_scores`)."""
    references = [ex.target for ex in examples]
    scores = example_scores(spec.metric_name, predictions, references)
    return [{"task": spec.name, "template": template, "source": ex.source,
             "reference": ex.target, "prediction": pred, "metric": spec.metric_name,
             "score": score}
            for ex, pred, score in zip(examples, predictions, scores)]


def write_predictions(path: Path, records: list[dict[str, Any]]) -> None:
    """``records`` as JSON lines at ``path``, written atomically and recorded in its
    directory's manifest (so a damaged file is named when read back)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, write, track=True)


def evaluate(model: Any, data: TaskData, tokenizer: Tokenizer, split: str, **options: Any
             ) -> dict[str, float]:
    """``{task: metric value, ..., "average_seen": mean, "average_held_out": mean}`` over every
    task that has ``split``, each task scored with its first template (see the module doc for
    ``average``); ``options``: :func:`evaluate_details`'s (``eval_options`` gives them)."""
    return evaluate_details(model, data, tokenizer, split, templates="first", **options).scores


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
    """The keyword arguments of :func:`evaluate` a run config sets for ``split``: few-shot
    (``data.eval_shots``) on the test split only, so checkpoint selection stays zero-shot."""
    return dict(limit=eval_limit(cfg, split), batch_size=max(cfg.train.batch_size, 32),
                max_source_len=cfg.data.max_source_len, max_target_len=cfg.data.max_target_len,
                max_new_tokens=cfg.train.generation_max_tokens,
                shots=cfg.data.eval_shots if split == "test" else 0, seed=cfg.train.seed)
