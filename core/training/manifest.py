"""Files that survive a crash at any moment and name any damage done to them since they were
written: atomic writes, and the SHA-256 manifest that a directory keeps of its files.

Every file is written to a temporary name, flushed and fsynced, then renamed over its target
(POSIX rename is atomic: :func:`atomic_write`), so a kill at any moment leaves the old file or
the new one, never a torn one.

A directory's ``manifest.json`` holds the SHA-256 and size of its files as last written
(``{"files": {name: {"sha256": hex, "size": bytes}}}``; which files a run directory and a
checkpoint list: the layout in :mod:`polytask.core.training.checkpoint`). A file that a
manifest lists is checked when it is read (:func:`read_json`, :func:`verify_file`, and the
weights and checkpoint loaders built on them); a changed or missing one is an
:class:`IntegrityError` naming it. A run file's entry is switched in two phases around the
rename (the new digest is added as ``next``, the file renamed, then the old digest dropped), so
a kill between them never makes an intact file look damaged. Directories written before
manifests existed have none and load unchecked (:func:`unverified_note` says so).

Atomic writes and manifests are one module because each needs the other: a tracked write
updates the manifest, and the manifest is itself written atomically. Checkpoints build on both.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection

MANIFEST = "manifest.json"
MISMATCH = "SHA-256 mismatch (file damaged or changed since it was written)"


class IntegrityError(ValueError):
    """A file differs from (or is missing but listed in) its directory's ``manifest.json``."""


# --- atomic writes --------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None], *, track: bool = False) -> None:
    """Call ``write(tmp_path)`` then fsync and rename ``tmp_path`` over ``path``. ``track``:
    record the new bytes in ``path``'s directory's manifest (two-phase, see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        files = entry = None
        if track:
            entry, files = _entry(Path(tmp)), read_manifest(path.parent) or {}
            old = files.get(path.name)
            if old is not None:                     # phase 1: either content is intact
                if "next" in old and _problem(path, old["next"]) is None:
                    old = old["next"]               # an earlier write died after its rename
                files[path.name] = {"sha256": old["sha256"], "size": old["size"], "next": entry}
                _write_manifest(path.parent, files)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if track:
            files[path.name] = entry                # phase 2: only the new content
            _write_manifest(path.parent, files)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any, *, track: bool = False) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, w, track=track)


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``, checked against its directory's manifest; any problem is one
    ``ValueError`` naming the file."""
    path = Path(path)
    if path.name != MANIFEST:
        verify_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"missing file: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- manifests ------------------------------------------------------------------------------

def _entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256(path), "size": path.stat().st_size}


def _valid_entry(e: Any, nested: bool = True) -> bool:
    return (isinstance(e, dict) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("size"), int) and e["size"] >= 0
            and ("next" not in e or (nested and _valid_entry(e["next"], False))))


def read_manifest(directory: str | Path) -> dict[str, dict[str, Any]] | None:
    """``directory/manifest.json``'s files (name -> ``{"sha256", "size"[, "next"]}``), or None
    when the directory has none (written before manifests existed)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(_valid_entry(e) for e in files.values()):
        raise IntegrityError(f"{path}: not a manifest (expected {{\"files\": {{name: "
                             f"{{\"sha256\": hex, \"size\": bytes}}}}}}): damaged or edited")
    return files


def _write_manifest(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    write_json(directory / MANIFEST, {"files": dict(sorted(files.items()))})


def _problem(path: Path, entry: dict[str, Any], *, quick: bool = False) -> str | None:
    """None when ``path`` holds the bytes ``entry`` (or its ``next``) records; else why not.
    ``quick``: compare sizes only."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    candidates = [entry] + ([entry["next"]] if "next" in entry else [])
    same_size = [c["sha256"] for c in candidates if c["size"] == size]
    if same_size and (quick or sha256(path) in same_size):
        return None
    return MISMATCH


def verify_file(path: str | Path, root: str | Path | None = None) -> bool:
    """Check ``path`` against ``root/manifest.json`` (default: its own directory's) and raise
    an :class:`IntegrityError` naming it when it is damaged, or missing but listed. True when
    checked, False when no manifest lists it. A mismatch is checked once more, since a
    writer in another process may have been between its rename and its manifest update."""
    path = Path(path)
    root = path.parent if root is None else Path(root)
    name = path.relative_to(root).as_posix()
    for _ in range(2):
        entry = (read_manifest(root) or {}).get(name)
        if entry is None:
            return False
        problem = _problem(path, entry)
        if problem is None:
            return True
    where = f" (listed in {root / MANIFEST})" if problem == "missing" else ""
    raise IntegrityError(f"{path}: {problem}{where}")


def verify_listed(root: str | Path, prefix: str) -> None:
    """:func:`verify_file` every file ``root/manifest.json`` lists under ``prefix``."""
    for name in sorted(read_manifest(root) or {}):
        if name.startswith(prefix):
            verify_file(Path(root) / name, root)


def record_files(directory: str | Path, names: Collection[str]) -> None:
    """Set the manifest entries of ``names`` (paths relative to ``directory``) to the files'
    current bytes; an absent file's entry is dropped. For files written without
    :func:`atomic_write`'s ``track`` (a tokenizer directory), or adopted from an older run."""
    directory = Path(directory)
    files = read_manifest(directory) or {}
    for name in names:
        path = directory / name
        if path.is_file():
            files[name] = _entry(path)
        else:
            files.pop(name, None)
    _write_manifest(directory, files)


def remove_file(path: str | Path) -> None:
    """Delete ``path`` and its manifest entry (the entry first: a kill in between leaves an
    unlisted file, never a listed missing one)."""
    path = Path(path)
    files = read_manifest(path.parent)
    if files is not None and path.name in files:
        del files[path.name]
        _write_manifest(path.parent, files)
    path.unlink(missing_ok=True)


def unverified_note(run_dir: str | Path) -> str | None:
    """A line for stderr when ``run_dir`` has no manifest (an older run): nothing in it can be
    checked for damage."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).is_file() or not run_dir.is_dir():
        return None
    return (f"{run_dir} has no {MANIFEST} (written by an older polytask): its files are "
            "loaded without an integrity check")

