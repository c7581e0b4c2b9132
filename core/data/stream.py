"""A resumable stream of fixed-length token chunks from raw-text files, for pretraining.

Files are read line by line (``.gz`` through :mod:`gzip`), never whole: a ``.jsonl`` file holds
one JSON object per line with the document under ``field``, any other file one document per
line. Blank documents are skipped. Each document is tokenized, followed by eos, and the token
stream is cut into chunks of ``chunk_tokens`` ids (documents run across chunk borders, as in T5's
``reduce_concat_tokens`` + ``split_tokens``). Chunks pass through a seeded shuffle buffer, and the
files repeat forever unless ``repeat=False``.

Everything the stream holds is in :meth:`TextStream.state_dict` (file index, byte offset,
epoch, leftover tokens, the shuffle buffer, the generator's state), so a run resumed from a
checkpoint sees exactly the chunks it would have seen without the interruption.

Validation split: the documents are numbered from 0 in every pass over the files (blank ones
not counted); document ``i`` is held out for validation when ``i % validation_every == 0``, so
the split is the same in every epoch and on every machine, and validation is never empty.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import numpy as np

SPLITS = ("train", "validation")


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _lines(f: IO[bytes], path: Path, after: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` from an open file whose first ``after`` lines are read; a
    damaged ``.gz`` file is a ``ValueError`` naming the line it broke at."""
    number = after
    while True:
        try:
            raw = f.readline()
        except (OSError, EOFError) as err:       # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}:{number + 1}: cannot read the file ({err})") from None
        if not raw:
            return
        number += 1
        yield number, raw


def _is_jsonl(path: Path) -> bool:
    return ".jsonl" in path.suffixes


def _document(path: Path, line_number: int, raw: bytes, field: str) -> str:
    """The text of one line of ``path``; a line that cannot be one is a ``ValueError``."""
    where = f"{path}:{line_number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: invalid UTF-8 at byte {err.start} of the line") from None
    if not _is_jsonl(path) or not line.strip():
        return line.rstrip("\r\n")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(map(str, record)) or "none"
        raise ValueError(f"{where}: no {field!r} key (keys: {keys}); pass field= the key that "
                         "holds the text")
    if not isinstance(record[field], str):
        raise ValueError(f"{where}: {field!r} is a {type(record[field]).__name__}, "
                         "expected a string")
    return record[field]


def _check_files(paths: Sequence[str | Path]) -> list[Path]:
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("no text files given")
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: file not found")
    return files


def iter_documents(paths: Sequence[str | Path], *,
                   field: str = "text") -> Iterator[tuple[str, int, str]]:
    """``(file, line number, text)`` of every non-blank document of ``paths``, in order."""
    for path in _check_files(paths):
        with _open(path) as f:
            for number, raw in _lines(f, path):
                text = _document(path, number, raw, field)
                if text.strip():
                    yield str(path), number, text


class TextStream:
    """Streams documents from plain-text (one document per line; blank lines skipped) or JSONL
    (one object per line, text under ``field``) files, optionally .gz, never loading a file
    whole; tokenizes each document, joins them with eos, and yields fixed-length chunks of
    ``chunk_tokens`` token ids, in a shuffle buffer of ``shuffle_buffer`` chunks (seeded),
    repeating the files forever (epochs). A deterministic 1-in-``validation_every`` document
    split (by document index; ``split="validation"`` yields only those, ``"train"`` the rest).

    With ``repeat=False`` iteration ends after one pass; the last tokens that do not fill a
    chunk are dropped. A pass that finds no document of the split is a ``ValueError``.
    """

    def __init__(self, paths: Sequence[str | Path], encode: Callable[[str], list[int]], *,
                 eos_id: int, chunk_tokens: int, split: str = "train", seed: int = 0,
                 shuffle_buffer: int = 1000, validation_every: int = 100,
                 field: str = "text", repeat: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        for name, value, least in (("chunk_tokens", chunk_tokens, 1),
                                   ("shuffle_buffer", shuffle_buffer, 1),
                                   ("validation_every", validation_every, 2)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} ({value!r}) must be an integer >= {least}")
        self.paths = _check_files(paths)
        self.encode, self.eos_id, self.chunk_tokens = encode, eos_id, chunk_tokens
        self.split, self.seed, self.shuffle_buffer = split, seed, shuffle_buffer
        self.validation_every, self.field, self.repeat = validation_every, field, repeat
        self._file: IO[bytes] | None = None
        self._reset()

    def _reset(self) -> None:
        self._file_index, self._offset, self._line, self._epoch = 0, 0, 0, 0
        self._document, self._found = 0, 0      # documents seen / of this split, this pass
        self._leftover: list[int] = []
        self._buffer: list[list[int]] = []
        self._done = False
        self._rng = np.random.default_rng(self.seed)
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        while len(self._buffer) < self.shuffle_buffer and not self._done:
            if len(self._leftover) >= self.chunk_tokens:
                self._buffer.append(self._leftover[:self.chunk_tokens])
                del self._leftover[:self.chunk_tokens]
            else:
                self._read_document()
        if not self._buffer:
            raise StopIteration
        # take a random chunk; the last one fills its slot (order inside the buffer is free)
        i = int(self._rng.integers(len(self._buffer)))
        self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
        return self._buffer.pop()

    def _read_document(self) -> None:
        """Append the next document of the split (and eos) to the leftover tokens, moving to the
        next file or epoch at an end of file; sets ``_done`` after the last pass."""
        path = self.paths[self._file_index]
        if self._file is None:
            self._file = _open(path)
            self._file.seek(self._offset)
        line = next(_lines(self._file, path, self._line), None)
        if line is None:
            self._next_file()
            return
        self._line, raw = line
        self._offset = self._file.tell()
        text = _document(path, self._line, raw, self.field)
        if not text.strip():
            return
        held_out = self._document % self.validation_every == 0
        self._document += 1
        if held_out == (self.split == "validation"):
            self._found += 1
            self._leftover.extend(list(self.encode(text)) + [self.eos_id])

    def _next_file(self) -> None:
        self._close()
        self._file_index, self._offset, self._line = self._file_index + 1, 0, 0
        if self._file_index < len(self.paths):
            return
        if not self._found:
            names = ", ".join(map(str, self.paths))
            raise ValueError(f"{names}: no documents for the {self.split!r} split "
                             f"({self._document} documents in all)")
        self._file_index, self._epoch, self._document, self._found = 0, self._epoch + 1, 0, 0
        self._done = not self.repeat

    @property
    def epoch(self) -> int:
        """Completed passes over the files."""
        return self._epoch

    def state_dict(self) -> dict:
        """Everything needed to continue exactly here; JSON-serialisable."""
        return {"paths": [str(p) for p in self.paths], "split": self.split,
                "chunk_tokens": self.chunk_tokens, "file_index": self._file_index,
                "offset": self._offset, "line": self._line, "epoch": self._epoch,
                "document": self._document, "found": self._found, "done": self._done,
                "leftover": list(self._leftover), "buffer": [list(c) for c in self._buffer],
                "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s ``state``; one taken from a stream over other
        files, another split or another chunk size is a ``ValueError``."""
        for key, mine in (("paths", [str(p) for p in self.paths]), ("split", self.split),
                          ("chunk_tokens", self.chunk_tokens)):
            if state.get(key) != mine:
                raise ValueError(f"stream state {key} {state.get(key)!r} does not match this "
                                 f"stream's {mine!r}")
        self._close()
        self._file_index, self._offset = int(state["file_index"]), int(state["offset"])
        self._line, self._epoch = int(state["line"]), int(state["epoch"])
        self._document, self._found = int(state["document"]), int(state["found"])
        self._done = bool(state["done"])
        self._leftover = [int(t) for t in state["leftover"]]
        self._buffer = [[int(t) for t in chunk] for chunk in state["buffer"]]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
