"""The training loop: one readable function, no trainer classes or callbacks.

``train(cfg, specs, run_dir)`` reads top to bottom: the run's parts (:mod:`polytask.experiments.
build`: data, tokenizer, model, objective, weighting, optimiser, sampler) -> loop (sample,
collate, forward, losses, weighted backward, guard against non-finite values, clip, step) ->
periodic evaluation, logging and atomic checkpoints -> final evaluation on the test split with
the best validation weights -> ``summary.json``. The model trains inside
:func:`polytask.core.accelerate.accelerated` (the CPU fast paths, switched on here).

The writer (rank 0) holds the run directory's lock (:mod:`polytask.core.training.lock`) from
start to end, and first removes what killed writes left behind.

Resuming (``resume=True``) starts from the newest intact checkpoint
(:func:`polytask.core.training.checkpoint.find_checkpoint`; each one passed over is named on
stderr; none intact is an error, never a silent fresh start). It restores model, optimiser,
scheduler, weighting, sampler position, template RNG and torch's RNG, the checkpoint's
``best.safetensors``, and cuts ``metrics.jsonl`` back to what that checkpoint had written, so
on CPU the resumed run ends bit-identical to an uninterrupted one. Settings in
:data:`RESUMABLE` may change on resume (:func:`resume_config`): they are recorded in
``config.json`` and as a ``{"event": "resume", ...}`` line of ``metrics.jsonl``.

A run that stops on non-finite losses (``train.max_bad_steps``), or none of whose steps was
finite, writes ``summary.json`` with ``"status": "non-finite"`` and raises
``FloatingPointError``; a run that trained says ``"status": "ok"``.

With ``train.save_base: false`` every weights file (the run's ``model.safetensors`` and
``best.safetensors``, each checkpoint's) holds only the trained tensors (``Parts.saved``); the
base they fit is rebuilt from ``init:`` by :func:`polytask.experiments.build.build_run`.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import time
from types import SimpleNamespace
from contextlib import nullcontext
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
from polytask.core.training.checkpoint import (MANIFEST, atomic_write, find_checkpoint,
                                               holds_checkpoints, load_checkpoint, load_weights,
                                               read_json, record_files, remove_file,
                                               remove_leftovers, save_checkpoint, save_weights,
                                               sha256, unverified_note, verify_file, write_json)
from polytask.core.training.lock import hold
from polytask.core.data.tasks import TaskSpec
from polytask.experiments.build import Parts, build_parts, build_run, seed_everything
from polytask.experiments.config import RunConfig, apply_overrides, parse_overrides
from polytask.losses.weighting import Weighting
from polytask.losses.weighting.base import GradientWeighting, run_backward
from polytask.losses.weighting.engine import SplitGradients, conflicts, merge, split_backward
from polytask.experiments.evaluate import (check_selection_metric, eval_options, evaluate,
                                           evaluate_details, scored_examples)


def train(cfg: RunConfig, specs: list[TaskSpec], run_dir: Path, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train one run; returns the summary written to ``run_dir/summary.json``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank trains on its shard of every global
    batch (:mod:`polytask.core.training.distributed`); rank 0 alone evaluates, logs and saves,
    and holds the run directory's lock while it does.
    """
    t = cfg.train
    rank, world = distributed.setup(t.device)
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by world size "
                         f"({world}) x train.grad_accum ({t.grad_accum})")
    run_dir = Path(run_dir)
    with hold(run_dir) if rank == 0 else nullcontext():
        summary = _train(cfg, specs, run_dir, resume, progress, rank, world)
    distributed.barrier()
    return summary


def _train(cfg: RunConfig, specs: list[TaskSpec], run_dir: Path, resume: bool, progress: bool,
           rank: int, world: int) -> dict[str, Any]:
    t = cfg.train
    lead = rank == 0
    if lead:
        _remove_leftovers(run_dir)
    ckpt = _checkpoint_to_resume(run_dir, resume, lead)
    changed = _changed_settings(run_dir, cfg) if ckpt is not None else {}
    unchecked = ckpt is not None and not (run_dir / MANIFEST).is_file()
    data, tokenizer, model = build_run(cfg, specs, run_dir, fresh_tokenizer=ckpt is None,
                                       rank=rank)
    if lead:
        _prepare_run_dir(run_dir, cfg, fresh=ckpt is None, adopt=unchecked)
    parts = build_parts(cfg, specs, data, model, rank=rank, world=world, announce=progress)
    state = _start_state(parts, model, ckpt, run_dir, lead, cfg, changed)
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not (progress and lead),
               dynamic_ncols=True)
    model.train()
    stop = False
    with accelerated(model):
        if t.max_steps == 0 and lead and ckpt is None:   # the initial model, evaluated and saved
            _evaluate_and_track(cfg, model, data, tokenizer, parts, state, run_dir, 0)
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
                _log(run_dir / "metrics.jsonl", {
                    "event": "train", "step": step, "loss": loss, "finite": finite, "lr": lr,
                    "step_s": seconds, "tokens_per_s": speed, "max_rss_mb": _max_rss_mb(),
                    **{f"loss/{k}": v for k, v in step_losses.items()}, **logs})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if step % t.eval_every == 0 or step == t.max_steps:
                if lead:
                    stop = _evaluate_and_track(cfg, model, data, tokenizer, parts, state, run_dir, step)
                else:
                    _end_epoch(parts.weighting, state)
                stop = distributed.broadcast_flag(stop)
            if lead and (step % t.save_every == 0 or step == t.max_steps or stop):
                _save(run_dir, step, model, parts, state)
        bar.close()
        if state["step"] > 0 and state["bad_steps"] >= state["step"]:
            raise _non_finite(run_dir, state, state["step"], f"none of the {state['step']} "
                              "steps had a finite loss and gradient: nothing was trained", lead)
        return _finish(cfg, model, data, tokenizer, state, run_dir, parts) if lead else {}


def _note(text: str) -> None:
    print(f"polytask: note: {text}", file=sys.stderr, flush=True)


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary files and directories of writes that a kill interrupted (the lock is held, so
    no other writer is using them)."""
    count, freed = remove_leftovers(run_dir)
    if count:
        _note(f"removed {count} temporary file(s) of interrupted writes from {run_dir} "
              f"({freed / 1e6:.1f} MB freed)")


def _checkpoint_to_resume(run_dir: Path, resume: bool, lead: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh). A fresh run never starts in a
    directory that holds another run's checkpoints or summary, and a resume never silently
    starts fresh: without an intact checkpoint it is an error saying what was found."""
    if not resume:
        if (run_dir / "summary.json").exists() or holds_checkpoints(run_dir):
            # A fresh run here would mix its files with the old run's checkpoints.
            raise ValueError(f"{run_dir} already holds a run; continue it with `polytask train "
                             f"--resume {run_dir}` or train into another --out directory")
        return None
    ckpt, notes = find_checkpoint(run_dir)
    if ckpt is None and not notes:
        raise ValueError(f"{run_dir}: nothing to resume (no checkpoint was saved); train it "
                         f"afresh with `polytask train CONFIG --out {run_dir}`")
    if ckpt is None:
        raise ValueError(f"{run_dir}: no intact checkpoint to resume from: {'; '.join(notes)} "
                         "(nothing was deleted)")
    if lead and notes:
        _note(f"{'; '.join(notes)}; resuming from checkpoints/{ckpt.name}")
    if lead and not (run_dir / MANIFEST).is_file():
        _note(unverified_note(run_dir) or f"{run_dir} has no {MANIFEST}")
    return ckpt


#: settings a resumed run may change: none changes what the saved optimiser, sampler, weighting
#: or best-validation score mean (test-only data options apply to the final test alone)
RESUMABLE = ("train.lr", "train.max_steps", "train.eval_every", "train.save_every",
             "train.early_stopping_patience", "train.max_bad_steps", "train.grad_clip",
             "data.test_examples", "data.eval_templates", "data.eval_shots")


def read_run_config(run_dir: Path) -> RunConfig:
    """A run's saved ``config.json`` (checked against its manifest); a problem names the file."""
    path = Path(run_dir) / "config.json"
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: holds a JSON {type(saved).__name__}, not a run config")
    try:
        return RunConfig.from_dict(saved, resolve_init=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The config to resume ``run_dir`` with: its saved one, with ``key=value`` overrides of
    :data:`RESUMABLE` keys; any other key is refused, listing those."""
    given = parse_overrides(overrides)
    refused = [k for k in given if k not in RESUMABLE]
    if refused:
        raise ValueError(f"{refused[0]} cannot change when a run resumes (its checkpoints were "
                         f"trained with the saved value); --resume may change only "
                         f"{', '.join(RESUMABLE)}")
    saved = read_run_config(run_dir)
    return RunConfig.from_dict(apply_overrides(saved.to_dict(), given), resolve_init=False)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_settings(run_dir: Path, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved, new) for each setting ``cfg`` changes against the run's
    ``config.json``; a key outside :data:`RESUMABLE` is refused."""
    old, new = _flat(read_run_config(run_dir).to_dict()), _flat(cfg.to_dict())
    missing = object()
    changed = {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
               if old.get(k, missing) != new.get(k, missing)}
    for key, (was, now) in changed.items():
        if key not in RESUMABLE:
            show = lambda v: "(unset)" if v is missing else repr(v)
            raise ValueError(f"{key} = {show(now)} differs from the run's {show(was)} "
                             f"({run_dir / 'config.json'}): its checkpoints were trained with "
                             f"it; on resume only {', '.join(RESUMABLE)} may change")
    return changed


def _prepare_run_dir(run_dir: Path, cfg: RunConfig, *, fresh: bool, adopt: bool) -> None:
    """Write ``config.json`` (recorded in the manifest). A fresh run first removes weights an
    earlier run killed before its first checkpoint left (they are not this run's); a resumed
    run of an older polytask records its files as they are, so they are checked from now on."""
    if fresh:
        for name in ("best.safetensors", "model.safetensors"):
            remove_file(run_dir / name)
    write_json(run_dir / "config.json", cfg.to_dict(), track=True)
    if adopt:
        tokenizer = run_dir / "tokenizer"
        names = ["tokenizer.model", "base.json", "best.safetensors", "model.safetensors"] + (
            [f"tokenizer/{p.name}" for p in sorted(tokenizer.iterdir()) if p.is_file()]
            if tokenizer.is_dir() else [])
        record_files(run_dir, [n for n in names if (run_dir / n).is_file()])


def _start_state(parts: Parts, model: torch.nn.Module, ckpt: Path | None, run_dir: Path,
                 lead: bool, cfg: RunConfig, changed: dict[str, tuple[Any, Any]]
                 ) -> dict[str, Any]:
    """The loop's bookkeeping, fresh or restored from ``ckpt`` with everything it saved."""
    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "evals_since_best": 0,
                             "bad_steps": 0, "consecutive_bad": 0, "metrics_bytes": 0,
                             "epoch_losses": {}}
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is None:
        if lead:
            metrics_path.write_text("")
        seed_everything(cfg.train.seed)
        return state
    tensors, saved = load_checkpoint(ckpt, model, parts.saved)
    state = _checked_state({**state, **saved} if isinstance(saved, dict) else saved,
                           ckpt / "state.json", cfg.train.max_steps)
    _restore(parts, tensors, state, ckpt)
    if "train.lr" in changed or "train.max_steps" in changed:
        _set_schedule(parts, cfg.train)
    if lead:
        _restore_best(run_dir, ckpt, state)
        _rewind_metrics(metrics_path, state["metrics_bytes"], ckpt, state["step"])
        if changed:
            _log(metrics_path, {"event": "resume", "step": state["step"],
                                "changed": {k: new for k, (_, new) in changed.items()},
                                "previous": {k: old for k, (old, _) in changed.items()}})
    return state


def _checked_state(state: Any, path: Path, max_steps: int) -> dict[str, Any]:
    """``state.json``'s values, typed and bounded before the loop trusts them; a bad one is
    one line naming the file, the key and the value."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a JSON {type(state).__name__}, not the loop's state")

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{path}: {key} = {json.dumps(state.get(key))[:60]} {why}")

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in ("sampler", "template_rng"):
        if key not in state:
            raise ValueError(f"{path}: missing {key}")
    step = state["step"]
    if not count(step) or f"step-{step:08d}" != path.parent.name:
        raise bad("step", f"does not match its checkpoint directory {path.parent.name}")
    if step > max_steps:
        raise ValueError(f"{path}: the checkpoint is at step {step}, beyond train.max_steps = "
                         f"{max_steps}; resume with train.max_steps={step} or more")
    for key in ("metrics_bytes", "bad_steps", "consecutive_bad", "evals_since_best"):
        if not count(state[key]):
            raise bad(key, "must be an integer >= 0")
    if state["bad_steps"] > step or state["consecutive_bad"] > state["bad_steps"]:
        raise bad("bad_steps", f"(consecutive {state['consecutive_bad']}) exceeds the steps "
                  f"taken ({step})")
    best, best_step = state["best"], state["best_step"]
    if (best is None) != (best_step is None):
        raise bad("best_step", f"and best = {best!r} must both be null or both set")
    if best_step is not None and (not count(best_step) or best_step > step):
        raise bad("best_step", f"must be a step in 0..{step}")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        raise bad("best", "must be a number")
    losses = state["epoch_losses"]
    if not isinstance(losses, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
            for v in losses.values()):
        raise bad("epoch_losses", "must map tasks to [sum, count]")
    if not isinstance(state["sampler"], dict) or not isinstance(state["template_rng"], list):
        raise bad("sampler", "and template_rng must be an object and a list")
    return state


def _restore(parts: Parts, tensors: dict[str, Any], state: dict[str, Any], ckpt: Path) -> None:
    """Optimiser, schedule, weighting, RNGs and sampler as the checkpoint saved them."""
    try:
        parts.optimizer.load_state_dict(tensors["optimizer"])
        parts.scheduler.load_state_dict(tensors["scheduler"])
        parts.weighting.load_state_dict(tensors["weighting"])
        torch.set_rng_state(tensors["torch_rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as err:
        raise ValueError(f"{ckpt / 'optim.pt'}: does not fit this run's optimiser, schedule or "
                         f"weighting ({type(err).__name__}: {_first_line(err)})") from None
    try:
        parts.sampler.load_state_dict(state["sampler"])
        parts.template_rng.setstate(_to_tuple(state["template_rng"]))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"{ckpt / 'state.json'}: sampler or template_rng does not fit this "
                         f"run ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _set_schedule(parts: Parts, t) -> None:
    """A resume that changes ``train.lr`` or ``train.max_steps``: the schedule continues from
    the restored step with the new values. The restored state keeps the old lr in the
    optimiser's param groups (``lr``, ``initial_lr``) and the scheduler's ``base_lrs``: all are
    set, and the current lr recomputed as LambdaLR does (its multiplier already reads the new
    ``max_steps``)."""
    sched = parts.scheduler
    sched.base_lrs = [t.lr] * len(sched.base_lrs)
    for group, multiplier in zip(parts.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = t.lr
        value = t.lr * multiplier(sched.last_epoch)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
    # what get_last_lr() (the logged lr) reports until the next scheduler step
    sched._last_lr = [group["lr"] for group in parts.optimizer.param_groups]


BEST = "best.safetensors"


def _restore_best(run_dir: Path, ckpt: Path, state: dict[str, Any]) -> None:
    """``best.safetensors`` as of the checkpoint: one written after it (by the run that was
    interrupted, or damaged since) would put another trajectory's weights into the final test
    while ``summary.json`` names the checkpoint's best step."""
    best, kept = run_dir / BEST, ckpt / BEST
    if state["best_step"] is None:
        if best.exists():
            remove_file(best)
            _note(f"removed {best}: written after checkpoints/{ckpt.name}, which has no best "
                  "validation yet")
        return
    if kept.is_file():   # verified with the checkpoint
        if not best.is_file() or not (os.path.samefile(best, kept) or sha256(best) == sha256(kept)):
            atomic_write(best, lambda tmp: shutil.copyfile(kept, tmp), track=True)
            _note(f"restored {best} from checkpoints/{ckpt.name} (the run's copy was missing, "
                  "damaged or written after that checkpoint)")
        return
    if not best.is_file():   # a checkpoint of an older polytask keeps no copy
        raise ValueError(f"{best}: missing, but {ckpt / 'state.json'} records the best "
                         f"validation at step {state['best_step']}; the final test would score "
                         "other weights: put the file back, or train the run afresh")
    verify_file(best)


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) else None


def _rewind_metrics(path: Path, recorded: int, ckpt: Path, step: int) -> None:
    """Cut ``metrics.jsonl`` back to the ``recorded`` bytes it held when ``ckpt`` (at ``step``)
    was saved, so that the resumed steps are not logged twice. The cut is made only where it
    is safe: the file is at least that long, the cut falls on a line boundary and every line
    before it is a JSON object. Otherwise the file keeps its complete valid lines within those
    bytes, less any of a later step, and stderr says so. The file never grows."""
    data = path.read_bytes() if path.is_file() else b""
    *complete, partial = data[:recorded].split(b"\n")
    records = [_record(line) for line in complete]
    if len(data) >= recorded and not partial and None not in records:
        if len(data) > recorded:
            os.truncate(path, recorded)
        return
    later = lambda r: isinstance(r.get("step"), int) and r["step"] > step
    keep = [line for line, r in zip(complete, records) if r is not None and not later(r)]
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"".join(l + b"\n" for l in keep)))
    why = [f"it had {len(data)} of the {recorded} bytes checkpoints/{ckpt.name} recorded"
           if len(data) < recorded else
           f"byte {recorded}, where checkpoints/{ckpt.name} ends, is inside a line"
           if partial else "some lines are not JSON objects"]
    dropped = records.count(None)
    if dropped:
        why.append(f"{dropped} invalid line(s) dropped")
    if len(complete) - dropped > len(keep):
        why.append(f"{len(complete) - dropped - len(keep)} line(s) of later steps dropped")
    _note(f"{path}: kept its {len(keep)} complete valid line(s) ({'; '.join(why)})")


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
        rows = [data.get(task, "train", i, random.Random(seed))
                for (task, i), seed in zip(parts.sampler.next_batch(micro), seeds)]
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
        if world > 1:
            units = {k: distributed.loss_units(output.tasks[k], batch, parts.reductions[k])
                     for k in task_losses}
            anchor = parts.trainable[0].reshape(-1)[0] * 0.0  # zero loss for tasks absent here
            task_losses = distributed.globalize(task_losses, units, parts.names, anchor)
        task_losses = {k: v / t.grad_accum for k, v in task_losses.items()}
        extra = result.extra_total()
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


def _full(loss: torch.Tensor) -> torch.Tensor:
    """A loss computed under bf16 autocast in float32; float32 and float64 ones as they are."""
    return loss.float() if loss.dtype in (torch.bfloat16, torch.float16) else loss


def splits_tasks(parts: Parts, model: torch.nn.Module, cfg: RunConfig) -> bool:
    """Whether this step forms per-task gradients in one pass over per-task sub-batches
    (:mod:`polytask.losses.weighting.engine`) instead of k passes over the joint graph: for
    gradient weightings, in one process, when no loss term couples rows of different tasks
    (the adversarial discriminator's, the orthogonality penalty)."""
    return (isinstance(parts.weighting, GradientWeighting)
            and not getattr(parts.weighting, "uses_representation", False)   # MGDA-UB
            and getattr(model, "discriminator", None) is None
            and cfg.sharing.orthogonality_weight == 0)


def _task_rows(batch: Batch, data, names: list[str]) -> dict[str, torch.Tensor]:
    """The row indices of each task present in ``batch``, in run order."""
    rows = {n: (batch.task_ids == data.task_index[n]).nonzero().flatten() for n in names}
    return {n: r for n, r in rows.items() if len(r)}


def _split_backward(cfg: RunConfig, parts: Parts, model: torch.nn.Module, data, batch: Batch,
                    logs: dict[str, float], world: int = 1) -> SplitGradients | None:
    """One micro-batch of a gradient weighting through the engine: each task's rows forward and
    backward on their own graph, giving the per-task gradients (combined by the weighting once
    per step, in :func:`_accumulate`); the extra terms are backpropagated here, unweighted.
    None (nothing accumulated) on a non-finite loss.

    Under data parallelism every rank takes the tasks present on *any* rank, in run order (a
    task without rows here gives a zero row), and scales its local loss by its share of the
    task's global loss units, so that the ranks' average of the ``(k, P)`` matrices (the
    weighting's reducer) is the global batch's, as in one process; the losses are the global
    values too."""
    t = cfg.train
    extras: list[torch.Tensor | None] = []
    rows = _task_rows(batch, data, parts.names)
    names, scale = list(rows), {n: 1.0 for n in rows}
    units = torch.zeros(len(parts.names), dtype=torch.float64)
    if world > 1:
        for i, n in enumerate(parts.names):
            if n in rows:
                head = SimpleNamespace(head=data.specs[n].head_kind, rows=rows[n])
                units[i] = distributed.loss_units(head, batch, parts.reductions[n])
        total = distributed.average(units.clone()) * world
        names = [n for i, n in enumerate(parts.names) if total[i] > 0]
        scale = {n: float(units[i] * world / total[i]) for i, n in enumerate(parts.names)
                 if total[i] > 0}
    anchor = parts.trainable[0].reshape(-1)[0] * 0.0   # a zero on the graph: no rows here

    def task_loss(name: str):
        def run() -> torch.Tensor | None:
            if name not in rows:
                return anchor
            sub = batch.select(rows[name]).trimmed()
            with torch.autocast(torch.device(t.device).type, dtype=torch.bfloat16,
                                enabled=t.bf16):
                result = parts.objective(model, model(sub), sub)
            if not extras:   # the soft-sharing penalty: one term per micro-batch, not per task
                extra = result.extra_total()
                extras.append(extra / t.grad_accum if extra is not None else None)
            logs.update({k: v for k, v in result.logs.items() if not k.startswith("loss/")})
            loss = result.task_losses.get(name)
            if loss is None:   # rows, but none labelled
                return anchor if world > 1 else None
            return _full(loss) * (scale[name] / t.grad_accum)
        return run

    shared = {id(p) for p in parts.shared}
    split = split_backward({n: task_loss(n) for n in names}, parts.shared,
                           [p for p in parts.trainable if id(p) not in shared],
                           reduce=parts.weighting.gradient_reducer, last_shared=parts.last_shared,
                           is_finite=lambda loss: distributed.all_true(bool(torch.isfinite(loss))))
    extra = extras[0] if extras else None
    if not distributed.all_true(split is not None and (extra is None or
                                                        bool(torch.isfinite(extra)))):
        return None
    if world > 1:   # the global loss values: the ranks' losses weighted by their units
        local = torch.zeros(len(parts.names), dtype=torch.float64)
        for name, loss in zip(split.task.names, split.task.losses.tolist()):
            i = parts.names.index(name)
            local[i] = loss / scale[name] * units[i] if scale[name] else 0.0
        value = distributed.average(local) * world / total.clamp_min(1)
        split.task.losses = torch.stack([value[parts.names.index(n)] for n in split.task.names])
    run_backward(None, extra)
    return split


def gradient_conflicts(cfg: RunConfig, parts: Parts, model: torch.nn.Module, data,
                       batch: Batch) -> dict[str, Any] | None:
    """Gradient-conflict diagnostics on ``batch`` (the training loop passes the step's last
    micro-batch at each evaluation): the per-task gradients on the shared parameters, their
    pairwise cosine similarities and the fraction of conflicting pairs
    (:func:`polytask.losses.weighting.engine.conflicts`). Nothing is accumulated into ``.grad``
    and torch's RNG is restored, so the run continues exactly as without it. None when fewer
    than two tasks with a loss are in the batch or nothing is shared."""
    t = cfg.train
    shared = [p for p in parts.shared if p.requires_grad]
    rows = _task_rows(batch, data, parts.names)
    if not shared or len(rows) < 2:
        return None
    autocast = torch.autocast(torch.device(t.device).type, dtype=torch.bfloat16, enabled=t.bf16)
    def task_loss(name: str, r: torch.Tensor):
        def run() -> torch.Tensor | None:
            sub = batch.select(r).trimmed()
            with autocast:
                loss = parts.objective(model, model(sub), sub).task_losses.get(name)
            return None if loss is None else _full(loss)
        return run

    # task losses never couple rows (only extra terms may), so the one-pass engine always applies
    with torch.random.fork_rng(devices=[]):
        split = split_backward({n: task_loss(n, r) for n, r in rows.items()}, shared, [])
    if split is None:
        return None
    matrix, names = split.task.matrix, split.task.names
    if len(names) < 2 or not bool(torch.isfinite(matrix).all()):
        return None
    return conflicts(matrix, names)


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
    state["template_rng"] = parts.template_rng.getstate()
    tensors = {"optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
               "weighting": parts.weighting.state_dict(), "torch_rng": torch.get_rng_state()}
    save_checkpoint(run_dir, step, model, tensors, json.loads(json.dumps(state)),
                    names=parts.saved, snapshot=(BEST,))


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def _end_epoch(weighting, state) -> None:
    """DWA's epoch is one evaluation interval: hand it the interval's mean task losses."""
    epoch = {k: s / n for k, (s, n) in state["epoch_losses"].items() if n}
    if epoch:
        weighting.end_epoch(epoch)
    state["epoch_losses"] = {}


def _evaluate_and_track(cfg: RunConfig, model, data, tokenizer, parts: Parts, state, run_dir,
                        step) -> bool:
    """Validation metrics, best-weights tracking, DWA's epoch, early stopping. True = stop."""
    key = cfg.train.early_stopping_metric
    check_selection_metric(key, data)   # held-out tasks never select checkpoints
    scores = evaluate(model, data, tokenizer, "validation", **eval_options(cfg, "validation"))
    _log(run_dir / "metrics.jsonl", {"event": "eval", "split": "validation", "step": step, **scores})
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


def _finish(cfg: RunConfig, model, data, tokenizer, state, run_dir, parts: Parts
            ) -> dict[str, Any]:
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
    _log(run_dir / "metrics.jsonl", {"event": "eval", "split": "test", "step": state["step"], **test})
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
