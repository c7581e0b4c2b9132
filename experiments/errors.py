"""The CLI's error boundary, its parts: which errors a user's input can cause
(:data:`ANTICIPATED`: one line, exit status 2), how each is named (:func:`error_message`), and
where an internal error's traceback goes (:func:`crash_report`). :func:`polytask.experiments.
cli.main` catches; this module words."""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

from safetensors import SafetensorError


#: what a user's input can cause (a bad file, path, key or value; a full disk): one line,
#: exit 2. OSError covers FileNotFoundError, PermissionError, IsADirectoryError, ...;
#: ValueError covers UnicodeDecodeError and json's JSONDecodeError.
ANTICIPATED = (ValueError, OSError, KeyError, FloatingPointError, RecursionError,
               SafetensorError)
#: errnos that only writing raises: an OSError without a file name is named by the command's
#: output location (a full disk during training is a write into the run directory)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the blanks around them) turned into single spaces:
    a foreign message (sentencepiece's, a traceback-like one) stays one line."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


def output_of(args: argparse.Namespace | None) -> str | None:
    """The path a command writes to, to name an OSError that names none."""
    if args is None:
        return None
    if args.command in ("train", "pretrain"):
        config = args.config and Path("runs") / Path(args.config).stem
        return str(args.resume or args.out or config or "") or None
    if args.command == "ablate":
        return str(args.out or Path("runs") / Path(args.config).stem)
    return {"generate": getattr(args, "output", None), "export": getattr(args, "onnx", None),
            "compare": getattr(args, "out", None), "eval": None}.get(args.command)


def error_message(err: BaseException, args: argparse.Namespace | None = None) -> str:
    """``<file or key>: <problem>`` for an anticipated error, on one line."""
    if isinstance(err, OSError):
        problem = err.strerror or str(err)
        if err.filename is not None:
            names = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
            return one_line(f"{names}: {problem}")
        where = output_of(args)
        if where and err.errno in WRITE_ERRNOS:
            return one_line(f"{where}: {problem} (while writing there)")
        return one_line(problem)
    if isinstance(err, KeyError):  # str(KeyError) quotes its argument: a key or a message
        key = err.args[0] if err.args else ""
        return one_line(key if isinstance(key, str) and " " in key else f"missing key {key!r}")
    if isinstance(err, RecursionError):
        return one_line(f"input nested too deeply ({err})")
    return one_line(str(err) or type(err).__name__)


def crash_report(err: BaseException) -> str:
    """Write ``err``'s traceback to a file under the temp directory; its path (or why not)."""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="polytask-crash-", suffix=".txt",
                                         delete=False, encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(err)))
            return f.name
    except OSError as e:
        return f"not written: {error_message(e)}"


def stdout_gone() -> bool:
    """True when stdout's reader has closed the pipe; stdout then points at devnull, so the
    interpreter's last flush does not fail again."""
    try:
        sys.stdout.flush()
        return False
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True
