"""Instruction data: read task files, apply instruction templates, hold a run's splits.

Every task is text-to-text (T5, Raffel et al. 2020): a *source* ("instruction [SEP] input")
and a *target* text; a classification target is its label word and ``Example.label`` its
index in ``TaskSpec.labels``. Records have the Alpaca / FLAN shape
``{"task", "instruction", "input", "output"}``, one JSON object per line (``.jsonl``), or the
same columns with a header row (``.csv`` / ``.tsv``); any of them may be gzipped (``.gz``).
Files are UTF-8, with or without the byte-order mark spreadsheets write. A task's ``files`` are
keyed by the split names of :data:`SPLITS`; another name (``dev``) is refused, not ignored.

Templates (FLAN, Wei et al. 2022): a task may declare several instruction phrasings. During
training one is drawn per example with an rng (:func:`apply_template`); at evaluation the first
is used, so scores are comparable between runs. A template replaces the record's
``instruction``; ``{options}`` in it becomes the comma-separated label words and ``{input}``
places the input explicitly (otherwise it follows the ``[SEP]``).

Held-out tasks (``TaskSpec.held_out``) are loaded for evaluation only: FLAN's zero-shot protocol.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import json
import random
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from polytask.core.data.tasks import SPLITS, TaskSpec

SEP = "[SEP]"
RECORD_KEYS = ("task", "instruction", "input", "output", "meta")


@dataclass(frozen=True)
class Example:
    """One formatted example.

    Fields:
        task: task name.
        source: the formatted model input, ``"instruction [SEP] input"``.
        target: the target text (a label word for classification).
        label: index of ``target`` in the task's labels; ``None`` for generation.
        meta: provenance and the raw ``instruction`` / ``input`` (so a template can be
            re-applied), plus ``file`` and ``line``.
    """

    task: str
    source: str
    target: str
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def format_source(instruction: str, input: str = "") -> str:
    """``"instruction [SEP] input"``; just the instruction when there is no input."""
    instruction, input = instruction.strip(), input.strip()
    return f"{instruction} {SEP} {input}" if input else instruction


def render(template: str, input: str, labels: Sequence[str] | None = None) -> str:
    """Fill one template. ``str.replace`` rather than ``str.format``: inputs contain braces."""
    text = template.replace("{options}", ", ".join(labels or []))
    if "{input}" in text:
        return text.replace("{input}", input).strip()
    return format_source(text, input)


def apply_template(example: Example, spec: TaskSpec, rng: random.Random | None = None) -> Example:
    """Re-format ``example`` with one of ``spec.templates``: drawn by ``rng`` (training) or
    the first (``rng=None``, evaluation). Without templates the record's instruction is kept."""
    if not spec.templates:
        return example
    template = spec.templates[0] if rng is None else rng.choice(spec.templates)
    return replace(example, source=render(template, example.meta.get("input", ""), spec.labels))


_CR_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # a line and its ending


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of ``path`` (gunzipped when it ends in ``.gz``), 1-based.

    Lines are decoded one at a time, so invalid UTF-8 is reported at its line (a text stream
    decodes ahead in blocks); a leading byte-order mark, as spreadsheets write UTF-8, is
    dropped. Lines end at ``\n``, ``\r\n`` or a lone ``\r``, as in text mode. A file that
    is not gzip, or is cut short, raises ``ValueError`` naming it.
    """
    n = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            for raw in f:
                if n == 0 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{n + 1}: invalid UTF-8 (byte 0x{raw[err.start]:02x} "
                                     f"at offset {err.start} of the line); save the file as UTF-8"
                                     ) from None
                for line in _CR_LINES.findall(text) if "\r" in text.rstrip("\r\n") else [text]:
                    n += 1
                    yield n, line
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from None
    except EOFError:
        raise ValueError(f"{path}: truncated gzip file (it ends before its end-of-stream "
                         "marker)") from None


def _file_kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1].lstrip(".") if suffixes else ""
    if kind not in ("jsonl", "csv", "tsv"):
        raise ValueError(f"{path}: unsupported data file type {kind!r}; choose .jsonl, .csv or "
                         ".tsv (optionally .gz)")
    return kind


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` from a JSONL, CSV or TSV file (1-based lines).

    Every problem of the file (not found, damaged gzip, invalid UTF-8 or JSON, JSON nested too
    deeply for Python's parser, a malformed CSV row) is a ``ValueError`` naming the file, and
    the line where there is one.
    """
    path = Path(path)
    kind = _file_kind(path)
    if not path.is_file():
        raise ValueError(f"{path}: data file not found")
    if kind == "jsonl":
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{n}: JSON nested too deeply to read") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            yield n, record
        return
    reader = csv.DictReader((text for _, text in _lines(path)),
                            delimiter="\t" if kind == "tsv" else ",")
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # the DictReader's line_num lags on an error, its reader's not
            raise ValueError(f"{path}:{reader.reader.line_num}: malformed {kind.upper()} "
                             f"({err})") from None
        if None in record:  # csv puts surplus cells under the key None
            raise ValueError(f"{path}:{reader.line_num}: more cells than header columns")
        yield reader.line_num, {k: v for k, v in record.items() if v is not None}


def _check_record(record: dict[str, Any], spec: TaskSpec, where: str) -> None:
    unknown = [k for k in record if k not in RECORD_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(RECORD_KEYS)}")
    if "output" not in record:
        raise ValueError(f"{where}: missing key 'output'")
    if "instruction" not in record and not spec.templates:
        raise ValueError(f"{where}: missing key 'instruction' and task {spec.name!r} has no templates")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {record[key]!r}")
    if not isinstance(record.get("meta", {}), dict):
        raise ValueError(f"{where}: 'meta' must be an object, got {record['meta']!r}")


def check_splits(spec: TaskSpec) -> None:
    """Refuse a file under a split name that is not one of :data:`SPLITS` (``dev`` for
    ``validation``): nothing would ever read it, and the run would quietly lack that split."""
    unknown = [name for name in spec.files if name not in SPLITS]
    if unknown:
        raise ValueError(f"tasks[{spec.name}].files.{unknown[0]}: unknown split {unknown[0]!r}; "
                         f"splits: {', '.join(SPLITS)}")


def load_task(spec: TaskSpec, split: str, *, root: str | Path | None = None,
              rng: random.Random | None = None) -> list[Example]:
    """Read ``spec.files[split]`` into formatted examples.

    Args:
        spec: the task; ``spec.files`` maps split names to files.
        split: e.g. ``"train"``; must be a key of ``spec.files``.
        root: directory that relative file paths are resolved against (default: the cwd).
        rng: draws a template per example (training); ``None`` uses the first (evaluation).

    Records whose ``task`` names another task are skipped: one file may hold a whole mixture,
    as FLAN's and Alpaca's do. A file that yields no example of this task is an error.
    """
    check_splits(spec)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if split not in spec.files:
        known = ", ".join(spec.files) or "none"
        raise ValueError(f"task {spec.name!r} has no {split!r} split; its splits: {known}")
    path = Path(spec.files[split])
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    examples = []
    for n, record in read_records(path):
        where = f"{path}:{n}"
        if (record.get("task") or spec.name) != spec.name:  # an empty CSV cell: this task
            continue
        _check_record(record, spec, where)
        output, input = record["output"].strip(), record.get("input", "")
        label = None
        if spec.kind == "classification":
            if output not in spec.labels:
                raise ValueError(f"{where}: label {output!r} of task {spec.name!r} is not one of "
                                 f"{', '.join(spec.labels)}")
            label = spec.labels.index(output)
        meta = {**record.get("meta", {}), "file": str(path), "line": n,  # reserved keys win
                "instruction": record.get("instruction", ""), "input": input}
        example = Example(spec.name, format_source(meta["instruction"], input), output, label, meta)
        examples.append(apply_template(example, spec, rng))
    if not examples:
        raise ValueError(f"{path}: no examples of task {spec.name!r}")
    return examples


@dataclass
class TaskData:
    """The tasks of one run and their examples: ``examples[task][split]``.

    ``train_tasks`` are mixed during training; ``held_out_tasks`` are only evaluated
    (zero-shot, FLAN). ``caps`` holds ``TaskSpec.max_examples`` for the mixture sampler:
    like T5's examples-proportional mixing with a limit, a cap lowers a task's *rate*
    while every example stays available.
    """

    specs: dict[str, TaskSpec]
    examples: dict[str, dict[str, list[Example]]]
    #: held-out tasks' training examples, read only as few-shot demonstrations (FLAN's
    #: exemplars): never sampled for training, never in the tokenizer's corpus
    held_out_train: dict[str, list[Example]] = field(default_factory=dict)

    @classmethod
    def load(cls, specs: Sequence[TaskSpec], splits: Sequence[str] = SPLITS, *,
             root: str | Path | None = None) -> "TaskData":
        """Load every split of every task that declares it (held-out tasks: their ``train``
        split only into :attr:`held_out_train`, for demonstrations)."""
        unknown = [sp for sp in splits if sp not in SPLITS]
        if unknown:
            raise ValueError(f"unknown split {unknown[0]!r}; splits: {', '.join(SPLITS)}")
        for spec in specs:
            check_splits(spec)
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names: {', '.join(duplicates)}")
        if not any(not s.held_out for s in specs):
            raise ValueError("every task is held out; at least one task must be trained on")
        untrainable = [s.name for s in specs if not s.held_out and "train" not in s.files]
        if untrainable:
            raise ValueError(f"task {untrainable[0]!r} has no 'train' file; give one or mark it "
                             "held_out")
        examples, held_out_train = {}, {}
        for spec in specs:
            wanted = [sp for sp in splits if sp in spec.files and not (spec.held_out and sp == "train")]
            examples[spec.name] = {sp: load_task(spec, sp, root=root) for sp in wanted}
            if spec.held_out and "train" in spec.files and "train" in splits:
                held_out_train[spec.name] = load_task(spec, "train", root=root)
        return cls({s.name: s for s in specs}, examples, held_out_train)

    def demonstrations(self, task: str) -> list[Example]:
        """The examples few-shot demonstrations of ``task`` are drawn from: its training split
        (a held-out task's too, kept apart from training: FLAN's few-shot exemplars)."""
        return self.examples[task].get("train") or self.held_out_train.get(task, [])

    @property
    def train_tasks(self) -> list[str]:
        return [n for n, s in self.specs.items() if not s.held_out]

    @property
    def held_out_tasks(self) -> list[str]:
        return [n for n, s in self.specs.items() if s.held_out]

    @property
    def task_index(self) -> dict[str, int]:
        """Task name -> the integer id used in ``Batch.task_ids`` (declaration order)."""
        return {name: i for i, name in enumerate(self.specs)}

    def sizes(self, split: str = "train") -> dict[str, int]:
        """Number of examples per trained task in ``split`` (the sampler's input)."""
        return {n: len(self.examples[n][split]) for n in self.train_tasks if split in self.examples[n]}

    @property
    def caps(self) -> dict[str, int]:
        return {n: s.max_examples for n, s in self.specs.items()
                if s.max_examples is not None and not s.held_out}

    def corpus(self) -> Iterator[str]:
        """Texts to train the tokenizer on: every training source and target, plus every
        template and label word of every task (held-out ones too, so their instructions are
        not unknown pieces); held-out examples are left out."""
        for name, spec in self.specs.items():
            yield from (render(t, "", spec.labels) for t in spec.templates)  # as the model sees them
            yield from spec.labels or []
            for example in self.examples[name].get("train", []):
                yield example.source
                yield example.target

    def get(self, task: str, split: str, index: int, rng: random.Random | None = None) -> Example:
        """One example, re-templated with ``rng`` (training) or the first template."""
        return apply_template(self.examples[task][split][index], self.specs[task], rng)
