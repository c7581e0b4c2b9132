"""The training loop: one readable function, no trainer classes or callbacks.

``train(cfg, specs, run_dir)`` reads top to bottom: data and tokenizer -> model -> objective,
weighting, optimiser -> loop (sample, collate, forward, losses, weighted backward, guard against
non-finite values, clip, step) -> periodic evaluation, logging and atomic checkpoints -> final
evaluation on the test split with the best validation weights -> ``summary.json``.

Resuming (``resume=True``) restores model, optimiser, scheduler, weighting, sampler position,
template RNG and torch's RNG from the last checkpoint and truncates ``metrics.jsonl`` to what
that checkpoint had written, so on CPU the resumed run ends bit-identical to an uninterrupted
one.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from polytask import losses
import polytask.losses.weighting.base as weighting_base
from polytask.core.training import distributed
from polytask.core.training.checkpoint import (latest_checkpoint, load_checkpoint, load_weights, read_json,
                             save_checkpoint, save_weights, write_json)
from polytask.core.data.collate import CollateReport, collate
from polytask.core.data.task_data import TaskData
from polytask.experiments.evaluate import evaluate
from polytask.core.training.optim import freeze, lr_lambda, make_optimizer
from polytask.core.data.sampling import MixtureSampler
from polytask.core.data.tasks import TaskSpec
from polytask.core.data.tokenizer import Tokenizer
from polytask.heads import build_model
from polytask.heads.objective import MultiTaskObjective


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_corpus(data: TaskData) -> list[str]:
    """The training texts (sources with filled templates, targets, label words); held-out
    tasks' evaluation texts are never seen."""
    return list(data.corpus())


def setup(cfg: Any, specs: list[TaskSpec], run_dir: Path, *, fresh_tokenizer: bool, rank: int = 0):
    """Data, tokenizer and model for a run directory (shared by train, eval and generate).
    Under data parallelism rank 0 trains and saves the tokenizer; the others load it."""
    data = TaskData.load(specs)
    tok_path = run_dir / "tokenizer.model"
    if fresh_tokenizer and rank == 0:
        tokenizer = Tokenizer.train(tokenizer_corpus(data), cfg.data.vocab_size,
                                    model_type=cfg.data.tokenizer)
        tokenizer.save(tok_path)
    distributed.barrier()
    if not (fresh_tokenizer and rank == 0):
        tokenizer = Tokenizer.load(tok_path)
    model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    seed_everything(cfg.train.seed)  # the initialisation depends on the seed only
    model = build_model(model_cfg, specs, cfg.sharing).to(
        device=cfg.train.device, dtype=getattr(torch, cfg.train.dtype))
    return data, tokenizer, model


def _eval_kwargs(cfg: Any) -> dict[str, int]:
    return dict(limit=cfg.data.eval_examples, batch_size=max(cfg.train.batch_size, 32),
                max_source_len=cfg.data.max_source_len, max_target_len=cfg.data.max_target_len,
                max_new_tokens=cfg.train.generation_max_tokens)


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: Any, specs: list[TaskSpec], run_dir: Path, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train one run; returns the summary written to ``run_dir/summary.json``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its shard of every global
    batch (:mod:`polytask.core.training.distributed`); rank 0 alone evaluates, logs and saves.
    """
    t = cfg.train
    rank, world = distributed.setup(t.device)
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by world size "
                         f"({world}) x train.grad_accum ({t.grad_accum})")
    lead = rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and ((run_dir / "summary.json").exists() or latest_checkpoint(run_dir)):
        # A fresh run here would mix its files with the old run's checkpoints.
        raise ValueError(f"{run_dir} already holds a run; continue it with `polytask train "
                         f"--resume {run_dir}` or train into another --out directory")
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and not (run_dir / "tokenizer.model").exists():
        resume = False  # nothing was saved yet: start from scratch
    data, tokenizer, model = setup(cfg, specs, run_dir, fresh_tokenizer=not resume, rank=rank)
    if lead:
        write_json(run_dir / "config.json", cfg.to_dict())
    n_layers = {"encoder": cfg.model.n_encoder_layers, "decoder": cfg.model.n_decoder_layers}
    if t.peft:
        from polytask.core.peft import apply_peft
        options = dict(t.peft)
        apply_peft(model, options.pop("method", "lora"), **options)
    if t.train_top_layers is not None or t.train_only:
        freeze(model, train_top_layers=t.train_top_layers, train_only=t.train_only, n_layers=n_layers)
    names = data.train_tasks
    loss_options = {s.name: cfg.losses.get(s.name, cfg.losses.get(s.loss_name, {})) for s in specs}
    reductions = {n: o.get("reduction", "token") for n, o in loss_options.items()}
    objective = MultiTaskObjective(specs, cfg.sharing, loss_options)
    weighting = losses.get_weighting(cfg.weighting.method)(names, **cfg.weighting.options)
    weighting.to(device=t.device, dtype=getattr(torch, t.dtype))
    params = list(model.named_parameters()) + list(weighting.named_parameters())
    trainable = [p for _, p in params if p.requires_grad]
    optimizer = make_optimizer(params, lr=t.lr, weight_decay=t.weight_decay,
                               betas=tuple(t.betas), device=torch.device(t.device))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup=t.warmup_steps, total=t.max_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio))
    sampler = MixtureSampler(data.sizes("train"), cfg.data.sampling, temperature=cfg.data.temperature,
                             cap=data.caps or cfg.data.cap, seed=t.seed, rank=rank, world_size=world)
    template_rng = random.Random(t.seed)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    last_shared = [p for p in model.last_shared_parameters() if p.requires_grad] or None
    weighting_base.GRADIENT_REDUCER = distributed.average if world > 1 else None
    report = CollateReport()
    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "evals_since_best": 0,
                             "bad_steps": 0, "consecutive_bad": 0, "metrics_bytes": 0,
                             "epoch_losses": {}}
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None:
        tensors, state = load_checkpoint(ckpt, model)
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        weighting.load_state_dict(tensors["weighting"])
        torch.set_rng_state(tensors["torch_rng"])
        sampler.load_state_dict(state["sampler"])
        template_rng.setstate(_to_tuple(state["template_rng"]))
        if lead:
            with open(metrics_path, "a") as f:  # drop lines written after the checkpoint
                f.truncate(state["metrics_bytes"])
    else:
        if lead:
            metrics_path.write_text("")
        seed_everything(t.seed)
    micro = t.batch_size // (world * t.grad_accum)
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not (progress and lead),
               dynamic_ncols=True)
    model.train()
    stop = False
    while state["step"] < t.max_steps and not stop:
        step = state["step"]
        t0 = time.perf_counter()
        model.set_progress(step / t.max_steps)
        step_losses: dict[str, float] = {}
        logs: dict[str, float] = {}
        finite, n_tokens = True, 0
        for _ in range(t.grad_accum):
            # One template seed per row of the *global* batch, so a rank's rows get the same
            # templates as in a single process (rank r holds global rows r, r + N, ...).
            seeds = [template_rng.getrandbits(64) for _ in range(micro * world)][rank::world]
            rows = [data.get(task, "train", i, random.Random(seed))
                    for (task, i), seed in zip(sampler.next_batch(micro), seeds)]
            batch = collate(rows, tokenizer, data.task_index, max_source_len=cfg.data.max_source_len,
                            max_target_len=cfg.data.max_target_len, truncation=cfg.data.truncation,
                            report=report).to(t.device)
            n_tokens += int(batch.src_mask.sum() + batch.tgt_mask.sum())
            with torch.autocast(torch.device(t.device).type, dtype=torch.bfloat16, enabled=t.bf16):
                output = model(batch)
                result = objective(model, output, batch)
            task_losses = {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v
                           for k, v in result.task_losses.items()}
            if world > 1:
                units = {k: distributed.loss_units(output.tasks[k], batch, reductions[k])
                         for k in task_losses}
                anchor = trainable[0].reshape(-1)[0] * 0.0  # zero loss for tasks absent here
                task_losses = distributed.globalize(task_losses, units, names, anchor)
            task_losses = {k: v / t.grad_accum for k, v in task_losses.items()}
            extra = result.extra_total()
            extra = extra / t.grad_accum if extra is not None else None
            ok = all(bool(torch.isfinite(v)) for v in task_losses.values()) and \
                (extra is None or bool(torch.isfinite(extra)))
            if not distributed.all_true(ok):
                finite = False
                break
            weights = weighting.backward(task_losses, shared, extra=extra, last_shared=last_shared)
            for k, v in task_losses.items():
                step_losses[k] = step_losses.get(k, 0.0) + float(v.detach())
            logs.update({k: v for k, v in result.logs.items() if not k.startswith("loss/")})
            logs.update({f"weight/{k}": float(w) for k, w in weights.items()})
        if finite and world > 1:
            distributed.average_gradients(trainable)
        if finite:
            max_norm = t.grad_clip if t.grad_clip is not None else float("inf")
            with_grad = [p for p in trainable if p.grad is not None]
            finite = bool(np.isfinite(float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))))
        if finite:
            optimizer.step()
            scheduler.step()
            state["consecutive_bad"] = 0
        else:  # never update parameters with non-finite values
            state["bad_steps"] += 1
            state["consecutive_bad"] += 1
            if state["consecutive_bad"] >= t.max_bad_steps:
                raise FloatingPointError(
                    f"{state['consecutive_bad']} consecutive steps with non-finite loss or "
                    f"gradient (train.max_bad_steps={t.max_bad_steps}); stopped at step {step}")
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        for k, v in step_losses.items():
            acc = state["epoch_losses"].setdefault(k, [0.0, 0])
            acc[0], acc[1] = acc[0] + v, acc[1] + 1
        seconds = time.perf_counter() - t0
        loss = sum(step_losses.values())
        if lead:
            _log(metrics_path, {"event": "train", "step": step, "loss": loss, "finite": finite,
                                "lr": scheduler.get_last_lr()[0],
                                "tokens_per_s": n_tokens * world / seconds,
                                "max_rss_mb": _max_rss_mb(),
                                **{f"loss/{k}": v for k, v in step_losses.items()}, **logs})
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{n_tokens * world / seconds:.0f}")
        bar.update(1)
        if step % t.eval_every == 0 or step == t.max_steps:
            if lead:
                stop = _evaluate_and_track(cfg, model, data, tokenizer, weighting, state, run_dir, step)
            else:
                _end_epoch(weighting, state)
            stop = distributed.broadcast_flag(stop)
        if lead and (step % t.save_every == 0 or step == t.max_steps or stop):
            state["metrics_bytes"] = metrics_path.stat().st_size
            state["sampler"] = sampler.state_dict()
            state["template_rng"] = template_rng.getstate()
            tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "weighting": weighting.state_dict(), "torch_rng": torch.get_rng_state()}
            save_checkpoint(run_dir, step, model, tensors, json.loads(json.dumps(state)))
    bar.close()
    weighting_base.GRADIENT_REDUCER = None
    summary = _finish(cfg, model, data, tokenizer, state, run_dir, report) if lead else {}
    distributed.barrier()
    return summary


def _max_rss_mb() -> float:
    """High-water mark of this process's resident memory (Linux reports KiB), for spotting
    growth over a long run."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def _end_epoch(weighting, state) -> None:
    """DWA's epoch is one evaluation interval: hand it the interval's mean task losses."""
    epoch = {k: s / n for k, (s, n) in state["epoch_losses"].items() if n}
    if epoch:
        weighting.end_epoch(epoch)
    state["epoch_losses"] = {}


def _evaluate_and_track(cfg, model, data, tokenizer, weighting, state, run_dir, step) -> bool:
    """Validation metrics, best-weights tracking, DWA's epoch, early stopping. True = stop."""
    scores = evaluate(model, data, tokenizer, "validation", **_eval_kwargs(cfg))
    _log(run_dir / "metrics.jsonl", {"event": "eval", "split": "validation", "step": step, **scores})
    _end_epoch(weighting, state)
    key = cfg.train.early_stopping_metric
    if key not in scores:
        raise ValueError(f"train.early_stopping_metric {key!r} is not evaluated; choose one of "
                         f"{', '.join(scores)}")
    if state["best"] is None or scores[key] > state["best"]:
        state["best"], state["best_step"], state["evals_since_best"] = scores[key], step, 0
        save_weights(run_dir / "best.safetensors", model)
    else:
        state["evals_since_best"] += 1
    patience = cfg.train.early_stopping_patience
    return patience is not None and state["evals_since_best"] >= patience


def _finish(cfg, model, data, tokenizer, state, run_dir, report) -> dict[str, Any]:
    if (run_dir / "best.safetensors").exists():
        load_weights(run_dir / "best.safetensors", model)
    test = evaluate(model, data, tokenizer, "test", **_eval_kwargs(cfg))
    _log(run_dir / "metrics.jsonl", {"event": "eval", "split": "test", "step": state["step"], **test})
    train_records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in train_records if r.get("event") == "train"]
    summary = {
        "test": test, "steps": state["step"], "best_step": state["best_step"],
        "best_validation": state["best"], "bad_steps": state["bad_steps"],
        "metrics": {n: s.metric_name for n, s in data.specs.items()},
        "held_out": data.held_out_tasks,
        "tokens_per_s": float(np.median(speeds)) if speeds else None,
        "truncation": {"truncated_source": report.truncated_source,
                       "truncated_target": report.truncated_target, "dropped": report.dropped},
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def load_run(run_dir: Path):
    """Config, data, tokenizer and model (final weights) of an existing run directory."""
    from polytask.experiments.config import RunConfig
    from polytask.experiments.runs import resolve_tasks
    cfg = RunConfig.from_dict(read_json(run_dir / "config.json"))
    data, tokenizer, model = setup(cfg, resolve_tasks(cfg), run_dir, fresh_tokenizer=False)
    load_weights(run_dir / "model.safetensors", model)
    model.eval()
    return cfg, data, tokenizer, model


def evaluate_run(run_dir: Path, split: str = "test") -> dict[str, float]:
    cfg, data, tokenizer, model = load_run(run_dir)
    return evaluate(model, data, tokenizer, split, **_eval_kwargs(cfg))


def generate_text(run_dir: Path, task: str, text: str, *, method: str = "greedy",
                  max_new_tokens: int = 48) -> str:
    from polytask.core.data.task_data import Example, apply_template, format_source
    from polytask.core.decoding.generation import generate
    cfg, data, tokenizer, model = load_run(run_dir)
    if task not in data.specs:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(data.specs)}")
    spec = data.specs[task]
    raw = Example(task, source=format_source(text), target="", meta={"input": text})
    src = torch.tensor([tokenizer.encode(apply_template(raw, spec).source)])
    ids = generate(model.for_task(task), src, max_new_tokens=max_new_tokens, method=method,
                   bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return tokenizer.decode(ids[0].tolist())
