"""The shipped pretraining corpus: English text made from WordNet 3.0's glosses.

``experiments/suite/data/corpus`` holds ``wordnet_glosses.txt.gz`` (gzipped UTF-8, one document
per line, no blank lines, every line newline-terminated, so it can be streamed line by line),
WordNet's ``LICENSE`` and ``SHA256SUMS``. One document is one synset written as English::

    dog, domestic dog, Canis familiaris: a member of the genus Canis (...); occurs in many
    breeds. For example: "the dog barked all night".

It is built by :mod:`polytask.experiments.suite.build_corpus` (which also explains what was
left out so that no validation or test target of a built-in task leaks); ``docs/tasks.md``
("Pretraining corpus") gives its size. Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from polytask.experiments.suite.writer import DATA_DIR

CORPUS_DIR = DATA_DIR / "corpus"
CORPUS_FILES = ("wordnet_glosses.txt.gz",)
CHECKSUMS = "SHA256SUMS"
_WORDS = re.compile(r"\w+")


def corpus_path(name: str = CORPUS_FILES[0], corpus_dir: Path = CORPUS_DIR) -> Path:
    """The path of shipped corpus file ``name``; an unknown name lists the known ones."""
    if name not in CORPUS_FILES:
        raise ValueError(f"unknown corpus file {name!r}; known files: {', '.join(CORPUS_FILES)}")
    return corpus_dir / name


def iter_documents(path: Path | None = None) -> Iterator[str]:
    """Yield the documents of a corpus file one at a time (without the newline)."""
    with gzip.open(path or corpus_path(), "rt", encoding="utf-8", newline="\n") as f:
        for line in f:
            yield line.rstrip("\n")


def normalise(text: str) -> str:
    """Lower-case words joined by single spaces: punctuation and spacing cannot hide a match."""
    return " ".join(_WORDS.findall(text.lower()))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_checksums(corpus_dir: Path = CORPUS_DIR) -> dict[str, str]:
    """File name -> SHA-256 hex digest, from ``SHA256SUMS`` (``sha256sum`` format)."""
    out = {}
    path = corpus_dir / CHECKSUMS
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{path}:{n}: expected '<sha256>  <file>', got {line!r}")
        out[name] = digest
    return out


@dataclass(frozen=True)
class CorpusStats:
    """Size of one corpus file: documents (lines), whitespace-separated words, bytes."""

    documents: int
    words: int
    bytes: int             # raw UTF-8 text, newlines included
    compressed_bytes: int  # the gzip file on disk


def corpus_stats(path: Path | None = None) -> CorpusStats:
    """Count documents, words and bytes of a corpus file by reading it once."""
    path = Path(path or corpus_path())
    documents = words = size = 0
    for doc in iter_documents(path):
        documents += 1
        words += len(doc.split())
        size += len(doc.encode("utf-8")) + 1
    return CorpusStats(documents, words, size, path.stat().st_size)


__all__ = ["CORPUS_DIR", "CORPUS_FILES", "CorpusStats", "corpus_path", "corpus_stats",
           "iter_documents", "normalise", "read_checksums", "sha256"]
