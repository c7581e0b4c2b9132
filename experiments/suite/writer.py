"""Write a derived task as compact, byte-reproducible gzipped JSONL split files.

Shared by the two build scripts (:mod:`polytask.experiments.suite.synthetic`,
:mod:`polytask.experiments.suite.build_wordnet`). Records have the Alpaca / FLAN shape that
:func:`polytask.core.data.task_data.load_task` reads. Gzip's header normally stores a timestamp and a file
name; both are fixed here so rebuilding gives identical bytes (and a clean ``git diff``).
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Sequence

DATA_DIR = Path(__file__).resolve().parent / "data"


def split_path(source: str, task: str, split: str, data_dir: Path = DATA_DIR) -> Path:
    """Where split ``split`` of ``task`` (derived from ``source``) lives."""
    return data_dir / source / f"{task}.{split}.jsonl.gz"


def split_rows(rows: Sequence[dict], sizes: dict[str, int], seed: int | None) -> dict[str, list[dict]]:
    """Shuffle ``rows`` with ``seed`` (``None``: keep their order, e.g. when the caller grouped
    related rows) and cut them into disjoint splits of at most ``sizes``.

    Held-out splits are filled first, so a small task still gets full validation and test
    sets and the training split takes what is left.
    """
    rows = list(rows)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    out, start = {}, 0
    for split in sorted(sizes, key=lambda s: s == "train"):
        out[split] = rows[start:start + sizes[split]]
        start += len(out[split])
    return out


def write_jsonl_gz(path: Path, records: Sequence[dict]) -> None:
    """Write ``records`` one JSON object per line, gzipped without timestamp or name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=9) as f:
        f.write(text.encode("utf-8"))


def write_task(source: str, task: str, instruction: str, rows: Sequence[dict],
               sizes: dict[str, int], seed: int | None, data_dir: Path = DATA_DIR) -> dict[str, int]:
    """Split ``rows`` (each ``{"input", "output"}``) and write one file per split.

    Returns the number of examples written per split.
    """
    counts = {}
    for split, part in split_rows(rows, sizes, seed).items():
        records = [{"task": task, "instruction": instruction, **r} for r in part]
        write_jsonl_gz(split_path(source, task, split, data_dir), records)
        counts[split] = len(records)
    return counts
