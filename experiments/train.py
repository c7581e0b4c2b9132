"""The training loop: one readable function, no trainer classes or callbacks.

``train(cfg, specs, run_dir)`` reads top to bottom: the run's parts (:mod:`polytask.experiments.
build`: data, tokenizer, model, objective, weighting, optimiser, sampler) -> loop (sample,
collate, forward, losses, weighted backward, guard against non-finite values, clip, step) ->
periodic evaluation, logging and atomic checkpoints -> final evaluation on the test split with
the best validation weights -> ``summary.json`` and ``predictions.jsonl`` (every scored test
example, :func:`polytask.experiments.evaluate.write_predictions`). With ``train.tensorboard``
every logged event also goes to TensorBoard (:mod:`polytask.experiments.tracking`). The model
trains inside :func:`polytask.core.accelerate.accelerated` (the CPU fast paths, switched on
here). Gradient weightings get their per-task gradients in one pass per micro-batch, and the
gradient-conflict diagnostics at each evaluation, from :mod:`polytask.experiments.task_gradients`.

Before the loop, :mod:`polytask.experiments.resume` takes the run directory (its lock, held by
rank 0 from start to end) and starts fresh or from the newest intact checkpoint, restoring
everything it saved; the files of a run directory are listed in
:mod:`polytask.core.training.checkpoint`.

A run that stops on non-finite losses (``train.max_bad_steps``), or none of whose steps was
finite, writes ``summary.json`` with ``"status": "non-finite"`` and raises
``FloatingPointError``; a run that trained says ``"status": "ok"``.

With ``train.save_base: false`` every weights file (the run's ``model.safetensors`` and
``best.safetensors``, each checkpoint's) holds only the trained tensors (``Parts.saved``); the
base they fit is rebuilt from ``init:`` by :func:`polytask.experiments.build.build_run`.
"""
from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from polytask.core.accelerate import accelerated
from polytask.core.data.batch import Batch
from polytask.core.data.collate import collate
from polytask.core.peft import parameter_counts
from polytask.core.training import distributed
from polytask.core.training.checkpoint import load_weights, save_checkpoint, save_weights
from polytask.core.training.manifest import MANIFEST, write_json
from polytask.core.data.tasks import TaskSpec
from polytask.experiments.build import Parts, build_parts, build_run
from polytask.experiments.config import RunConfig
from polytask.experiments.continual import (StageHooks, continual_terms, replay_examples,
                                            train_stages)
from polytask.losses.weighting import Weighting
from polytask.losses.weighting.engine import SplitGradients, merge
from polytask.experiments.evaluate import (check_selection_metric, eval_options, evaluate,
                                           evaluate_details, scored_examples, PREDICTIONS,
                                           write_predictions)
from polytask.heads.experts import gate_table
from polytask.experiments.task_gradients import (_split_backward, gradient_conflicts,
                                                 splits_tasks)
from polytask.experiments.resume import (BEST, _changed_settings, _checkpoint_to_resume,
                                         _first_line, _prepare_run_dir, _start_state,
                                         claimed)
from polytask.experiments.tracking import log_event, tensorboard_writer


def train(cfg: RunConfig, specs: list[TaskSpec], run_dir: Path, *, resume: bool = False,
          progress: bool = True, stage: StageHooks | None = None) -> dict[str, Any]:
    """Train one run; returns the summary written to ``run_dir/summary.json``.

    A config with ``stages:`` is a continual run: its stages, each one plain run of this
    function (``stage``: the replay rows, penalty and carried-over heads it adds), are trained
    in turn by :func:`polytask.experiments.continual.train_stages`.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its shard of every global
    batch (:mod:`polytask.core.training.distributed`); rank 0 alone evaluates, logs and saves,
    and holds the run directory's lock while it does.
    """
    if cfg.stages is not None:
        return train_stages(cfg, Path(run_dir), resume=resume, progress=progress,
                            train_stage=train)
    rank, world = setup_ranks(cfg.train)
    run_dir = Path(run_dir)
    with claimed(run_dir, rank == 0):
        summary = _train(cfg, specs, run_dir, resume, progress, rank, world, stage)
    distributed.barrier()
    return summary


def setup_ranks(t) -> tuple[int, int]:
    """``(rank, world size)`` of this process (:func:`polytask.core.training.distributed.setup`
    on ``train.device``), after checking that every rank gets whole micro-batches."""
    rank, world = distributed.setup(t.device)
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by world size "
                         f"({world}) x train.grad_accum ({t.grad_accum})")
    return rank, world


def _train(cfg: RunConfig, specs: list[TaskSpec], run_dir: Path, resume: bool, progress: bool,
           rank: int, world: int, stage: StageHooks | None = None) -> dict[str, Any]:
    t = cfg.train
    lead = rank == 0
    ckpt = _checkpoint_to_resume(run_dir, resume, lead)
    changed = _changed_settings(run_dir, cfg) if ckpt is not None else {}
    unchecked = ckpt is not None and not (run_dir / MANIFEST).is_file()
    data, tokenizer, model = build_run(cfg, specs, run_dir, fresh_tokenizer=ckpt is None,
                                       rank=rank)
    if lead:
        _prepare_run_dir(run_dir, cfg, fresh=ckpt is None, adopt=unchecked)
    if stage is not None and ckpt is None:   # a resumed stage's checkpoint holds them
        stage.carry_over(model)
    parts = build_parts(cfg, specs, data, model, rank=rank, world=world, announce=progress)
    if stage is not None:
        parts.stage = stage
        parts.replay_sampler = stage.replay_sampler(data, cfg, rank, world)
    state = _start_state(parts, model, ckpt, run_dir, lead, cfg, changed)
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not (progress and lead),
               dynamic_ncols=True)
    model.train()
    stop = False
    with accelerated(model), tensorboard_writer(cfg, run_dir, lead, state["step"]) as writer:
        if t.max_steps == 0 and lead and ckpt is None:   # the initial model, evaluated and saved
            _evaluate_and_track(cfg, model, data, tokenizer, parts, state, run_dir, 0, writer)
            _save(run_dir, 0, model, parts, state)
        while state["step"] < t.max_steps and not stop:
            step = state["step"]
            t0 = time.perf_counter()
            model.set_progress(step / t.max_steps)
            step_losses, logs, finite, n_tokens, batch = _accumulate(cfg, parts, model, data,
                                                                     tokenizer, rank, world)
            try:
                finite = _update(parts, state, finite, world, step, t)
            except FloatingPointError as err:   # train.max_bad_steps in a row
                raise _non_finite(run_dir, state, step + 1, str(err), lead) from None
            if finite and world == 1 and _observes_steps(parts.weighting):
                _after_step(parts, model, batch, t)
            state["step"] = step = step + 1
            for k, v in step_losses.items():
                acc = state["epoch_losses"].setdefault(k, [0.0, 0])
                acc[0], acc[1] = acc[0] + v, acc[1] + 1
            seconds = time.perf_counter() - t0
            speed = n_tokens * world / seconds
            loss, lr = sum(step_losses.values()), parts.scheduler.get_last_lr()[0]
            if lead:
                log_event(writer, run_dir / "metrics.jsonl", {
                    "event": "train", "step": step, "loss": loss, "finite": finite, "lr": lr,
                    "step_s": seconds, "tokens_per_s": speed, "max_rss_mb": _max_rss_mb(),
                    **{f"loss/{k}": v for k, v in step_losses.items()}, **logs})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if step % t.eval_every == 0 or step == t.max_steps:
                if lead and finite:   # gradient conflicts and expert gates, on the last micro-batch
                    for event, found in (("gradients", gradient_conflicts(cfg, parts, model, data,
                                                                          batch)),
                                         ("gates", gate_table(model, batch))):
                        if found is not None:
                            log_event(writer, run_dir / "metrics.jsonl",
                                      {"event": event, "step": step, **found})
                if lead:
                    stop = _evaluate_and_track(cfg, model, data, tokenizer, parts, state, run_dir,
                                               step, writer)
                else:
                    _end_epoch(parts.weighting, state)
                stop = distributed.broadcast_flag(stop)
            if lead and (step % t.save_every == 0 or step == t.max_steps or stop):
                _save(run_dir, step, model, parts, state)
        bar.close()
        if state["step"] > 0 and state["bad_steps"] >= state["step"]:
            raise _non_finite(run_dir, state, state["step"], f"none of the {state['step']} "
                              "steps had a finite loss and gradient: nothing was trained", lead)
        return (_finish(cfg, model, data, tokenizer, state, run_dir, parts, writer) if lead
                else {})


def _non_finite(run_dir: Path, state: dict[str, Any], steps: int, reason: str,
                lead: bool) -> FloatingPointError:
    """The error that ends a run without finite training, after rank 0 wrote a
    ``summary.json`` that says so (no test metrics: nothing trained was tested)."""
    summary = run_dir / "summary.json"
    if lead:
        write_json(summary, {"status": "non-finite", "steps": steps,
                             "bad_steps": state["bad_steps"],
                             "finite_steps": steps - state["bad_steps"],
                             "best_step": state["best_step"], "reason": reason})
    return FloatingPointError(f"{reason}; {summary} records status non-finite")


def _accumulate(cfg: RunConfig, parts: Parts, model: torch.nn.Module, data, tokenizer,
                rank: int, world: int
                ) -> tuple[dict[str, float], dict[str, float], bool, int, Batch]:
    """Forward and weighted backward of ``train.grad_accum`` micro-batches. Returns the step's
    task losses, logs, whether every loss was finite, the number of tokens and the last
    micro-batch."""
    t = cfg.train
    micro = t.batch_size // (world * t.grad_accum)
    step_losses: dict[str, float] = {}
    logs: dict[str, float] = {}
    n_tokens = 0
    splits: list[SplitGradients] = []   # the engine's per-task gradients, combined once a step
    for _ in range(t.grad_accum):
        # One template seed per row of the *global* batch, so a rank's rows get the same
        # templates as in a single process (rank r holds global rows r, r + N, ...).
        seeds = [parts.template_rng.getrandbits(64) for _ in range(micro * world)][rank::world]
        n_replay = parts.stage.replay_rows(micro) if parts.replay_sampler is not None else 0
        rows = [data.get(task, "train", i, random.Random(seed))
                for (task, i), seed in zip(parts.sampler.next_batch(micro - n_replay), seeds)]
        if n_replay:   # continual: earlier stages' training rows (experiments.continual)
            rows += replay_examples(data, parts.replay_sampler.next_batch(n_replay),
                                    seeds[micro - n_replay:])
        batch = collate(rows, tokenizer, data.task_index, max_source_len=cfg.data.max_source_len,
                        max_target_len=cfg.data.max_target_len, truncation=cfg.data.truncation,
                        report=parts.report).to(t.device)
        n_tokens += int(batch.src_mask.sum() + batch.tgt_mask.sum())
        if splits_tasks(parts, model, cfg):
            split = _split_backward(cfg, parts, model, data, batch, logs, world)
            if split is None:
                return step_losses, logs, False, n_tokens, batch
            splits.append(split)
            for name, loss in zip(split.task.names, split.task.losses.tolist()):
                step_losses[name] = step_losses.get(name, 0.0) + loss
            continue
        with torch.autocast(torch.device(t.device).type, dtype=torch.bfloat16, enabled=t.bf16):
            output = model(batch)
            result = parts.objective(model, output, batch)
        task_losses = {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v
                       for k, v in result.task_losses.items()}
        extra = result.extra_total()
        if parts.stage is not None:
            task_losses, extra = continual_terms(parts.stage, parts.names, model, task_losses,
                                                 extra, logs)
        if world > 1:
            units = {k: distributed.loss_units(output.tasks[k], batch, parts.reductions[k])
                     for k in task_losses}
            anchor = parts.trainable[0].reshape(-1)[0] * 0.0  # zero loss for tasks absent here
            task_losses = distributed.globalize(task_losses, units, parts.names, anchor)
        task_losses = {k: v / t.grad_accum for k, v in task_losses.items()}
        extra = extra / t.grad_accum if extra is not None else None
        ok = all(bool(torch.isfinite(v)) for v in task_losses.values()) and \
            (extra is None or bool(torch.isfinite(extra)))
        if not distributed.all_true(ok):
            return step_losses, logs, False, n_tokens, batch
        representation = ({"representation": output.shared}
                          if getattr(parts.weighting, "uses_representation", False) else {})
        weights = parts.weighting.backward(task_losses, parts.shared, extra=extra,
                                           last_shared=parts.last_shared, **representation)
        for k, v in task_losses.items():
            step_losses[k] = step_losses.get(k, 0.0) + float(v.detach())
        logs.update({k: v for k, v in result.logs.items() if not k.startswith("loss/")})
        logs.update({f"weight/{k}": float(w) for k, w in weights.items()})
    if splits:
        step = merge(splits, parts.names)
        if step.task.names:
            update, weights = parts.weighting.combine(step.task)
            step.apply(update, weights)
            logs.update({f"weight/{n}": float(w) for n, w in zip(step.task.names, weights.tolist())})
    return step_losses, logs, True, n_tokens, batch


def _observes_steps(weighting: Weighting) -> bool:
    """Whether the weighting learns from the losses right after an optimizer step (FAMO's
    ``after_step``; the base class's is a no-op)."""
    return type(weighting).after_step is not Weighting.after_step


@torch.no_grad()
def _after_step(parts: Parts, model: torch.nn.Module, batch: Batch, t) -> None:
    """FAMO's protocol (Liu et al. 2023, their ``update(loss_after)``): the task losses of the
    step's last micro-batch again, with the updated parameters, handed to the weighting. One
    more forward per step, for the weightings that ask for it. (Under data parallelism the
    weighting observes the next step's losses instead: see its docstring.)"""
    with torch.autocast(torch.device(t.device).type, dtype=torch.bfloat16, enabled=t.bf16):
        result = parts.objective(model, model(batch), batch)
    parts.weighting.after_step({k: v.float() for k, v in result.task_losses.items()})


def _update(parts: Parts, state: dict[str, Any], finite: bool, world: int, step: int,
            t) -> bool:
    """Average gradients across ranks, clip, and step — never with non-finite values.
    Returns whether the step was taken."""
    if finite and world > 1:
        distributed.average_gradients(parts.trainable)
    if finite:
        max_norm = t.grad_clip if t.grad_clip is not None else float("inf")
        with_grad = [p for p in parts.trainable if p.grad is not None]
        finite = bool(np.isfinite(float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))))
    if finite:
        parts.optimizer.step()
        parts.scheduler.step()
        state["consecutive_bad"] = 0
    else:
        state["bad_steps"] += 1
        state["consecutive_bad"] += 1
        if state["consecutive_bad"] >= t.max_bad_steps:
            raise FloatingPointError(
                f"{state['consecutive_bad']} consecutive steps with non-finite loss or "
                f"gradient (train.max_bad_steps={t.max_bad_steps}); stopped at step {step}")
    parts.optimizer.zero_grad(set_to_none=True)
    return finite


def _save(run_dir: Path, step: int, model: torch.nn.Module, parts: Parts,
          state: dict[str, Any]) -> None:
    state["metrics_bytes"] = (run_dir / "metrics.jsonl").stat().st_size
    state["sampler"] = parts.sampler.state_dict()
    if parts.replay_sampler is not None:
        state["replay_sampler"] = parts.replay_sampler.state_dict()
    state["template_rng"] = parts.template_rng.getstate()
    tensors = {"optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
               "weighting": parts.weighting.state_dict(), "torch_rng": torch.get_rng_state()}
    save_checkpoint(run_dir, step, model, tensors, json.loads(json.dumps(state)),
                    names=parts.saved, snapshot=(BEST,))


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a bad line is one error naming the file and line."""
    records = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError as err:
                raise ValueError(f"{path}:{i}: not a JSON line ({_first_line(err)})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{i}: a JSON {type(record).__name__}, not an object")
            records.append(record)
    return records


def _max_rss_mb() -> float:
    """High-water mark of this process's resident memory (Linux reports KiB), for spotting
    growth over a long run."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _end_epoch(weighting, state) -> None:
    """DWA's epoch is one evaluation interval: hand it the interval's mean task losses."""
    epoch = {k: s / n for k, (s, n) in state["epoch_losses"].items() if n}
    if epoch:
        weighting.end_epoch(epoch)
    state["epoch_losses"] = {}


def _evaluate_and_track(cfg: RunConfig, model, data, tokenizer, parts: Parts, state, run_dir,
                        step, writer=None) -> bool:
    """Validation metrics, best-weights tracking, DWA's epoch, early stopping. True = stop."""
    key = cfg.train.early_stopping_metric
    check_selection_metric(key, data)   # held-out tasks never select checkpoints
    scores = evaluate(model, data, tokenizer, "validation", **eval_options(cfg, "validation"))
    log_event(writer, run_dir / "metrics.jsonl",
              {"event": "eval", "split": "validation", "step": step, **scores})
    _end_epoch(parts.weighting, state)
    if key not in scores:
        raise ValueError(f"train.early_stopping_metric {key!r} is not evaluated; choose one of "
                         f"{', '.join(scores)}")
    if state["best"] is None or scores[key] > state["best"]:
        state["best"], state["best_step"], state["evals_since_best"] = scores[key], step, 0
        save_weights(run_dir / BEST, model, parts.saved, track=True)
    else:
        state["evals_since_best"] += 1
    patience = cfg.train.early_stopping_patience
    return patience is not None and state["evals_since_best"] >= patience


def _finish(cfg: RunConfig, model, data, tokenizer, state, run_dir, parts: Parts,
            writer=None) -> dict[str, Any]:
    report = parts.report
    if state["best_step"] is not None:   # never silently the last weights instead
        best = run_dir / BEST
        if not best.is_file():
            raise ValueError(f"{best}: missing, but the run's best validation was at step "
                             f"{state['best_step']}; the test would score other weights: put "
                             "the file back, or resume from an earlier checkpoint")
        load_weights(best, model, parts.saved)   # a damaged file is named
    options = eval_options(cfg, "test")   # every test example unless data.test_examples
    # main scores: the first template (with data.eval_shots demonstrations); "all" adds the rest
    details = evaluate_details(model, data, tokenizer, "test", templates=cfg.data.eval_templates,
                               **options)
    test = details.scores
    log_event(writer, run_dir / "metrics.jsonl",
              {"event": "eval", "split": "test", "step": state["step"], **test})
    write_predictions(run_dir / PREDICTIONS, details.predictions)
    speeds = [r["tokens_per_s"] for r in _records(run_dir / "metrics.jsonl")
              if r.get("event") == "train" and "tokens_per_s" in r]
    summary = {
        "status": "ok", "test": test, "steps": state["step"], "best_step": state["best_step"],
        "best_validation": state["best"], "bad_steps": state["bad_steps"],
        "metrics": {n: s.metric_name for n, s in data.specs.items()},
        "held_out": data.held_out_tasks,
        "examples": {"test": scored_examples(data, "test", options["limit"])},
        "eval_templates": cfg.data.eval_templates,
        # mean/min/max over the templates scored; per_template[0] is the main score
        "templates": details.templates,
        "shots": cfg.data.eval_shots,
        "demonstrations": details.demonstrations,   # mean used per example (length budget)
        "tokens_per_s": float(np.median(speeds)) if speeds else None,
        "truncation": {"truncated_source": report.truncated_source,
                       "truncated_target": report.truncated_target, "dropped": report.dropped},
        # the model's parameters as trained (PEFT and freezing applied); each shared tensor once
        "parameters": parameter_counts(model),
    }
    write_json(run_dir / "summary.json", summary)
    return summary
