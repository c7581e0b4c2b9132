"""Starting a run in its directory, fresh or resumed: what
:func:`polytask.experiments.train.train` does before its loop.

The writer (rank 0) holds the run directory's lock (:mod:`polytask.core.training.lock`) from
start to end, and first removes what killed writes left behind (:func:`claimed`). A fresh run
never starts in a directory that holds another run's checkpoints or summary.

Resuming (``resume=True``) starts from the newest intact checkpoint
(:func:`polytask.core.training.checkpoint.find_checkpoint`; each one passed over is named on
stderr; none intact is an error, never a silent fresh start). It restores model, optimiser,
scheduler, weighting, sampler position, template RNG and torch's RNG, the checkpoint's
``best.safetensors``, and cuts ``metrics.jsonl`` back to what that checkpoint had written, so
on CPU the resumed run ends bit-identical to an uninterrupted one. Settings in
:data:`RESUMABLE` may change on resume (:func:`resume_config`): they are recorded in
``config.json`` and as a ``{"event": "resume", ...}`` line of ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from polytask.core.training.checkpoint import (find_checkpoint, holds_checkpoints,
                                               load_checkpoint, remove_leftovers)
from polytask.core.training.lock import hold
from polytask.core.training.manifest import (MANIFEST, atomic_write, read_json, record_files,
                                             remove_file, sha256, unverified_note, verify_file,
                                             write_json)
from polytask.experiments.build import Parts, seed_everything
from polytask.experiments.config import RunConfig
from polytask.experiments.config_files import apply_overrides, parse_overrides

#: the run's best validation weights (with ``train.save_base: false``, the trained tensors only)
BEST = "best.safetensors"


@contextmanager
def claimed(run_dir: Path, lead: bool) -> Iterator[None]:
    """The run directory held by its writer (``lead``, rank 0) from start to end, after it
    removed what killed writes left behind; the other ranks write nothing and hold nothing."""
    if not lead:
        yield
        return
    with hold(run_dir):
        _remove_leftovers(run_dir)
        yield


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
             "data.test_examples", "data.eval_templates", "data.eval_shots", "train.tensorboard")


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
    """Optimiser, schedule, weighting, RNGs and samplers as the checkpoint saved them."""
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
        if parts.replay_sampler is not None:   # continual: earlier stages' rows
            parts.replay_sampler.load_state_dict(state["replay_sampler"])
        parts.template_rng.setstate(_to_tuple(state["template_rng"]))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"{ckpt / 'state.json'}: sampler or template_rng does not fit this "
                         f"run ({type(err).__name__}: {_first_line(err)})") from None


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


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


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _note(text: str) -> None:
    print(f"polytask: note: {text}", file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]
