"""Checkpoints that survive a crash at any moment, load without unpickling anything, and name
any file that was damaged since it was written.

Layout of a run directory::

    config.json            the run config (JSON)
    tokenizer.model        the sentencepiece model
    model.safetensors      the latest model weights (safetensors: tensors only, no code)
    base.json              with ``train.save_base: false`` only: the ``init:`` checkpoint the
                           weight files build on, and the SHA-256 of its weights file(s)
    manifest.json          SHA-256 and size of the files above (and of ``best.safetensors``,
                           ``tokenizer/*``) as last written (training.manifest)
    metrics.jsonl          one JSON object per logged event
    summary.json           final metrics, written when the run ends
    predictions.jsonl      every scored test example: source, reference, prediction, score
    tensorboard/           with ``train.tensorboard: true``: TensorBoard event files
    .lock                  held by the process writing into the directory (training.lock)
    checkpoints/LATEST     name of the newest complete checkpoint directory
    checkpoints/step-N/    model.safetensors, optim.pt (tensors + plain containers, loaded with
                           torch.load(weights_only=True)), state.json (step, sampler, RNG ...),
                           best.safetensors (a hard link: the best weights as of step N) and
                           manifest.json (SHA-256 and size of each), written last

Every file is written atomically (:func:`polytask.core.training.manifest.atomic_write`), and a
checkpoint directory only becomes visible to ``resume`` when ``LATEST`` is switched to it, as
the last step. A kill at any moment therefore leaves the previous checkpoint intact and
loadable.

Integrity: every file a directory's ``manifest.json`` lists is checked when it is read
(:func:`load_weights`, :func:`load_checkpoint`; :mod:`polytask.core.training.manifest`); a
changed or missing one is an ``IntegrityError`` naming it. Resuming (:func:`find_checkpoint`)
skips damaged checkpoints and takes the newest intact one.

A weights file holds the whole model, or — ``names`` in :func:`save_weights`,
:func:`load_weights` and the checkpoint functions — exactly a named subset of it (a run with
``train.save_base: false`` keeps only what it trained; the rest is rebuilt from its base).
Loading stays strict either way: the file must hold exactly the expected tensors.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Collection

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polytask.core.training.manifest import (MANIFEST, IntegrityError, _entry, _fsync_dir,
                                             _problem, _write_manifest, atomic_write, read_json,
                                             read_manifest, verify_file, write_json)

LATEST = "LATEST"
CHECKPOINT_FILES = ("model.safetensors", "optim.pt", "state.json")
_STEP = re.compile(r"step-(\d+)")


class UnsafeCheckpointError(ValueError, pickle.UnpicklingError):
    """``torch.load(weights_only=True)`` refused a file: one line for the CLI (ValueError) and
    still the UnpicklingError that callers of ``torch.load`` catch."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied (shared-storage) tensors stored once, as safetensors requires."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue  # the tie is rebuilt by the model's constructor
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


# --- weights --------------------------------------------------------------------------------

def save_weights(path: str | Path, model: torch.nn.Module,
                 names: Collection[str] | None = None, *, track: bool = False) -> None:
    """The model's tensors (:func:`model_state`), or only those in ``names``, as safetensors;
    ``track``: as :func:`polytask.core.training.manifest.atomic_write`."""
    state = model_state(model)
    if names is not None:
        keep = set(names)
        unknown = sorted(keep - set(state))
        if unknown:
            raise ValueError(f"{path}: not tensors of the model: {', '.join(unknown)}")
        state = {k: v for k, v in state.items() if k in keep}
    atomic_write(path, lambda tmp: save_file(state, tmp), track=track)


def check_state(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str, *,
                side: str = "file", names: str = "",
                extra_unexpected: list[str] | None = None,
                expected: Collection[str] | None = None) -> None:
    """Raise one ``ValueError`` listing missing, unexpected and mis-shaped tensors of ``state``
    against ``model`` (tied copies, stored once, are not missing). ``side`` labels the
    state's shapes, ``names`` qualifies the missing names (e.g. " (polytask names)");
    ``expected``: the state should hold exactly these of the model's tensors (default: all)."""
    tensors = model.state_dict()
    if expected is None:
        tied = set(tensors) - set(model_state(model))
        missing = sorted(set(tensors) - set(state) - tied)
        wanted = set(tensors)
    else:
        wanted = set(expected)
        missing = sorted(wanted - set(state))
    unexpected = sorted((extra_unexpected or []) + [k for k in state if k not in wanted])
    shapes = sorted(f"{k}: {side} {tuple(state[k].shape)} vs model {tuple(tensors[k].shape)}"
                    for k in set(state) & wanted if state[k].shape != tensors[k].shape)
    parts = []
    if missing:
        parts.append(f"missing tensors{names}: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {', '.join(unexpected)}")
    if shapes:
        parts.append(f"mis-shaped tensors: {'; '.join(shapes)}")
    if parts:
        raise ValueError(f"{source}: tensors do not match the model: " + " | ".join(parts))


def load_weights(path: str | Path, model: torch.nn.Module,
                 names: Collection[str] | None = None) -> None:
    """Load safetensors weights; missing, unexpected or mis-shaped tensors are listed. With
    ``names`` the file must hold exactly those tensors (the rest of ``model`` is kept). The
    file is checked against its directory's manifest; a mismatch of tensor names or shapes is
    reported as such (more specific than "damaged"), an unreadable or changed file as
    damaged when a manifest lists it."""
    path = Path(path)
    if not path.is_file():
        verify_file(path)   # listed: "missing (listed in ...)"
        raise ValueError(f"missing weights file: {path}")
    try:
        verify_file(path)
        damage = None
    except IntegrityError as err:
        damage = err
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if damage is not None:
            raise damage from None
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    source = str(path) if names is None else f"{path} (the trained tensors only)"
    check_state(state, model, source, expected=names)
    if damage is not None:
        raise damage
    model.load_state_dict(state, strict=False)


# --- checkpoints ----------------------------------------------------------------------------

def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` directory under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)       # free: the run's file is only ever replaced by rename
    except OSError:
        shutil.copyfile(source, target)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                    tensors: dict[str, Any], state: dict[str, Any], keep: int = 2,
                    names: Collection[str] | None = None,
                    snapshot: Collection[str] = ()) -> Path:
    """Write ``checkpoints/step-N`` completely (its manifest last), then switch ``LATEST`` to
    it, then update the run's ``model.safetensors``, then prune (:func:`_prune`). ``names``:
    the weights files (the checkpoint's and the run's) hold only these tensors. ``snapshot``:
    run files kept with the checkpoint as they are now (``best.safetensors``), so a resume
    from it restores them rather than mixing in ones written later."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        save_weights(tmp / "model.safetensors", model, names)
        atomic_write(tmp / "optim.pt", lambda p: torch.save(tensors, p))
        write_json(tmp / "state.json", state)
        files = {n: _entry(tmp / n) for n in CHECKPOINT_FILES}
        recorded = read_manifest(run_dir) or {}
        for name in snapshot:
            if (run_dir / name).is_file():
                _link_or_copy(run_dir / name, tmp / name)
                # the digest the run recorded: a copy damaged since then fails at resume
                known = recorded.get(name)
                files[name] = ({"sha256": known["sha256"], "size": known["size"]}
                               if known and "next" not in known else _entry(tmp / name))
        _write_manifest(tmp, files)
        _fsync_dir(tmp)
        aside = root / f".step-{step:08d}.replaced"
        if final.exists():   # the same step saved again: move the old one aside first
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    atomic_write(root / LATEST, lambda p: Path(p).write_text(final.name))
    save_weights(run_dir / "model.safetensors", model, names, track=True)
    _prune(root, step, keep)
    return final


def _prune(root: Path, newest: int, keep: int) -> None:
    """Delete the checkpoints that ``step-<newest>`` (complete, named by ``LATEST``)
    supersedes: any numbered after it (left by a run that was resumed from an earlier one)
    and all but the ``keep - 1`` newest before it that look intact (sizes as recorded; a
    damaged one is never kept in place of an intact one)."""
    kept = 1
    for step, path in _step_dirs(root):
        if step == newest:
            continue
        if step < newest and kept < keep and checkpoint_problem(path, quick=True) is None:
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_problem(path: str | Path, *, quick: bool = False) -> str | None:
    """None when checkpoint directory ``path`` is intact (every file its manifest lists holds
    the recorded bytes; without a manifest — an older run — its files are present), else
    what is wrong, e.g. ``is damaged (model.safetensors: SHA-256 mismatch)``. ``quick``:
    sizes only."""
    path = Path(path)
    if not path.is_dir():
        return "is missing"
    try:
        files = read_manifest(path)
    except ValueError:
        return f"is damaged ({MANIFEST} unreadable)"
    if files is None:
        absent = [n for n in CHECKPOINT_FILES if not (path / n).is_file()]
        return f"is incomplete (no {', '.join(absent)})" if absent else None
    unlisted = [n for n in CHECKPOINT_FILES if n not in files]
    if unlisted:
        return f"is damaged ({MANIFEST} does not list {', '.join(unlisted)})"
    for name, entry in sorted(files.items()):
        problem = _problem(path / name, entry, quick=quick)
        if problem is not None:
            return f"is damaged ({name}: {problem.split(' (')[0]})"
    return None


def _latest_name(root: Path, notes: list[str]) -> str | None:
    """The checkpoint name in ``LATEST`` if it is one (``step-N``, nothing outside ``root``)."""
    pointer = root / LATEST
    if not pointer.exists():
        if _step_dirs(root):
            notes.append(f"checkpoints/{LATEST} is missing")
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        notes.append(f"checkpoints/{LATEST} is unreadable ({_first_line(err)})")
        return None
    if not _STEP.fullmatch(name):
        notes.append(f"checkpoints/{LATEST} names {name[:60]!r}, not a checkpoint of this run")
        return None
    return name


def find_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and a note for each one passed over: the one ``LATEST``
    names when it is intact, else the newest intact ``checkpoints/step-N`` (a checkpoint
    becomes ``step-N`` only when complete, so one newer than ``LATEST`` is complete too).
    None when there is no intact one; the notes then say what was found."""
    root = Path(run_dir) / "checkpoints"
    notes: list[str] = []
    named = _latest_name(root, notes)
    if named is not None:
        problem = checkpoint_problem(root / named)
        if problem is None:
            return root / named, notes
        notes.append(f"checkpoints/{named} (named by {LATEST}) {problem}")
    for _, path in _step_dirs(root):
        if path.name == named:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notes
        notes.append(f"checkpoints/{path.name} {problem}")
    return None, notes


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (:func:`find_checkpoint`), or None."""
    return find_checkpoint(run_dir)[0]


def holds_checkpoints(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` has any checkpoint, intact or not, or a ``LATEST``."""
    root = Path(run_dir) / "checkpoints"
    return (root / LATEST).exists() or bool(_step_dirs(root))


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    names: Collection[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model weights (only ``names``, when given); return (tensor state, JSON state).
    Nothing is unpickled: ``optim.pt`` is read with ``weights_only=True``, which refuses
    arbitrary objects (and is safe on any bytes, so it runs before the digest check: a
    refused file is reported as refused). Every file is checked against the manifest."""
    path = Path(path)
    optim = path / "optim.pt"
    try:
        tensors = torch.load(optim, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        verify_file(optim)
        raise ValueError(f"missing file: {optim}") from None
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"{optim}: refused by torch.load(weights_only=True) "
                                    f"({_first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        verify_file(optim)
        raise ValueError(f"{optim}: not a readable torch file ({_first_line(err)})") from None
    verify_file(optim)
    if not isinstance(tensors, dict):
        raise ValueError(f"{optim}: holds a {type(tensors).__name__}, not a dict of states")
    load_weights(path / "model.safetensors", model, names)
    return tensors, read_json(path / "state.json")


def remove_leftovers(run_dir: str | Path) -> tuple[int, int]:
    """Delete what killed writes leave behind: ``.NAME.XXXX.tmp`` files of
    :func:`atomic_write` in the run directory and ``checkpoints/``, and unfinished
    ``checkpoints/.step-N.XXXX`` directories of :func:`save_checkpoint`. Only the holder of
    the run's lock may call this (another writer's temporary files are not leftovers).
    Returns (how many, bytes freed)."""
    run_dir = Path(run_dir)
    found = [p for d in (run_dir, run_dir / "checkpoints") if d.is_dir()
             for p in d.glob(".*.tmp") if p.is_file()]
    found += [p for p in (run_dir / "checkpoints").glob(".step-*") if p.is_dir()]
    freed = 0
    for p in found:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        # a hard link (a checkpoint's best.safetensors) frees nothing while the run holds it
        freed += sum(st.st_size for f in files if (st := f.lstat()).st_nlink == 1)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(found), freed
