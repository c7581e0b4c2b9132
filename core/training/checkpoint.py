"""Checkpoints that survive a crash at any moment, and load without unpickling anything.

Layout of a run directory::

    config.json            the run config (JSON)
    tokenizer.model        the sentencepiece model
    model.safetensors      the latest model weights (safetensors: tensors only, no code)
    base.json              with ``train.save_base: false`` only: the ``init:`` checkpoint the
                           weight files build on, and the SHA-256 of its weights file(s)
    metrics.jsonl          one JSON object per logged event
    summary.json           final metrics, written when the run ends
    checkpoints/LATEST     name of the newest complete checkpoint directory
    checkpoints/step-N/    model.safetensors, optim.pt (tensors + plain containers, loaded with
                           torch.load(weights_only=True)), state.json (step, sampler, RNG ...)

Every file is written to a temporary name, flushed and fsynced, then renamed over its target
(POSIX rename is atomic), and a checkpoint directory only becomes visible to ``resume`` when
``LATEST`` is switched to it, as the last step. A kill at any moment therefore leaves the
previous checkpoint intact and loadable.

A weights file holds the whole model, or — ``names`` in :func:`save_weights`,
:func:`load_weights` and the checkpoint functions — exactly a named subset of it (a run with
``train.save_base: false`` keeps only what it trained; the rest is rebuilt from its base).
Loading stays strict either way: the file must hold exactly the expected tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection

import torch
from safetensors.torch import load_file, save_file

LATEST = "LATEST"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then fsync and rename ``tmp_path`` over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, w)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


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


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(path: str | Path, model: torch.nn.Module,
                 names: Collection[str] | None = None) -> None:
    """The model's tensors (:func:`model_state`), or only those in ``names``, as safetensors."""
    state = model_state(model)
    if names is not None:
        keep = set(names)
        unknown = sorted(keep - set(state))
        if unknown:
            raise ValueError(f"{path}: not tensors of the model: {', '.join(unknown)}")
        state = {k: v for k, v in state.items() if k in keep}
    atomic_write(path, lambda tmp: save_file(state, tmp))


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
    ``names`` the file must hold exactly those tensors (the rest of ``model`` is kept)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"missing weights file: {path}")
    state = load_file(str(path))
    source = str(path) if names is None else f"{path} (the trained tensors only)"
    check_state(state, model, source, expected=names)
    model.load_state_dict(state, strict=False)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                    tensors: dict[str, Any], state: dict[str, Any], keep: int = 2,
                    names: Collection[str] | None = None) -> Path:
    """Write ``checkpoints/step-N`` completely, then switch ``LATEST`` to it. ``names``: the
    weights files (the checkpoint's and the run's) hold only these tensors."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        save_weights(tmp / "model.safetensors", model, names)
        atomic_write(tmp / "optim.pt", lambda p: torch.save(tensors, p))
        write_json(tmp / "state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / LATEST, lambda p: Path(p).write_text(final.name))
    save_weights(Path(run_dir) / "model.safetensors", model, names)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    names: Collection[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model weights (only ``names``, when given); return (tensor state, JSON state).
    Nothing is unpickled: ``optim.pt`` is read with ``weights_only=True``, which refuses
    arbitrary objects."""
    path = Path(path)
    load_weights(path / "model.safetensors", model, names)
    tensors = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    return tensors, read_json(path / "state.json")
