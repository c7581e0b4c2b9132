"""One writer per run directory.

Two ``polytask train`` processes writing into one directory interleave their
``metrics.jsonl`` lines and prune each other's checkpoints. :func:`hold` takes an exclusive
``fcntl.flock`` on ``RUN_DIR/.lock`` for as long as the writer runs, and writes who holds it
(pid, host, command, start time) into the file so that a second writer is refused with a line
naming the holder::

    runs/x is in use by pid 1234 on host h (polytask train, started 2025-01-02 10:00:00);
    wait for it or use another --out

The kernel drops a ``flock`` when its process dies, however it dies (``kill -9`` included),
so a stale lock never blocks anyone: the file stays, the lock does not. (``flock`` is local to
one machine on some network file systems; the host in the message shows which machine.)
Under ``torchrun`` only rank 0 writes and so only rank 0 holds the lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

LOCK = ".lock"


class RunDirBusy(ValueError):
    """Another process holds the run directory's lock."""


def _open_dir(run_dir: Path) -> int:
    """Create ``run_dir`` and open its lock file; OS errors become one line naming the path."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{run_dir}: is a file, not a run directory; choose another "
                         "--out") from None
    except OSError as err:
        raise ValueError(f"{run_dir}: {err.strerror or err}") from None
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a directory; choose another --out")
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(f"{run_dir / LOCK}: {err.strerror or err}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        os.close(fd)
        raise ValueError(f"{run_dir}: read-only directory; choose another --out")
    return fd


def _holder(fd: int) -> dict[str, Any]:
    """What the holder wrote into the lock file (it writes right after locking: wait briefly
    for it)."""
    for _ in range(20):
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            if isinstance(data, dict):
                return data
        except (ValueError, OSError):
            pass
        time.sleep(0.05)
    return {}


def describe(holder: dict[str, Any]) -> str:
    """``pid 1234 on host h (polytask train, started ...)``, or what is known of it."""
    if "pid" not in holder:
        return "another process (it has not said which)"
    return (f"pid {holder['pid']} on host {holder.get('host', '?')} "
            f"({holder.get('command', '?')}, started {holder.get('started', '?')})")


@contextmanager
def hold(run_dir: str | Path, command: str = "polytask train") -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the directory) until the block ends; raise
    :class:`RunDirBusy`, naming the holder, when another process holds it."""
    run_dir = Path(run_dir)
    fd = _open_dir(run_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{run_dir / LOCK}: cannot lock ({err.strerror})") from None
            raise RunDirBusy(f"{run_dir} is in use by {describe(_holder(fd))}; wait for it or "
                             "use another --out") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)   # still locked here: nobody reads a half-cleared file
    finally:
        os.close(fd)              # releases the lock
