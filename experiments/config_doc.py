"""Write ``docs/config.md``, the reference of every run-config key, from the typed config classes.

    python -m polytask.experiments.config_doc > docs/config.md

Each key's type, default and allowed values come from its dataclass field (``Literal`` choices,
the :func:`polytask.core.model.fields.bounds` metadata that :func:`check_fields` enforces, and
the registries for names such as ``weighting.method``); the options of losses and weightings
come from their constructors' signatures, as :meth:`Registry.check_options` reads them. The
one line of meaning is, in this order: ``field(metadata={"doc": ...})``, the entry for the
field in the class docstring's ``Fields:`` or ``Args:`` section, or the comment lines right
above the declaration followed by the comment ending it. The document is therefore only as
complete as those comments: ``tests/experiments/test_config_doc.py`` regenerates it, fails
when the file in the repository differs, and checks that every field has a description.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, get_args, get_origin

from polytask.core.data.tasks import TaskSpec
from polytask.core.model.config import ModelConfig
from polytask.core.model.fields import UNBOUNDED
from polytask.core.peft.options import OPTIONS as PEFT_OPTIONS
from polytask.experiments.config import (DEVICE_FORMS, DataConfig, RunConfig,
                                         TrainConfig, WeightingConfig)
from polytask.heads.config import SharingConfig, strategy_names
from polytask.experiments.continual_config import ContinualConfig
from polytask.experiments.pretrain_config import PretrainDataConfig, PretrainSection
from polytask.heads.task_adapters import TaskAdapterOptions
from polytask.losses import LOSSES, WEIGHTINGS
from polytask.losses.registry import Registry, accepted_options, option_types

COMMAND = "python -m polytask.experiments.config_doc > docs/config.md"

#: (section, class) in the order of a config file; ``tasks[]`` is one entry of ``tasks:``
SECTIONS: list[tuple[str, type]] = [
    ("model", ModelConfig), ("tasks[]", TaskSpec), ("sharing", SharingConfig),
    ("weighting", WeightingConfig), ("data", DataConfig), ("train", TrainConfig),
    ("continual", ContinualConfig)]


def _choices() -> dict[str, str]:
    """Allowed values of string fields checked against a registry, not a ``Literal``."""
    return {"sharing.strategy": _names(strategy_names()),
            "weighting.method": _names(WEIGHTINGS.names()),
            "tasks[].loss": _names(LOSSES.names()) + "; null: `ce` for a classifier head, "
                            "`generative` otherwise",
            "train.device": DEVICE_FORMS,
            "train.peft": "`method:` one of " + _names(PEFT_OPTIONS) + ", plus its options "
                          "(below)"}


def _names(names: Any) -> str:
    return ", ".join(f"`{n}`" for n in names)


# --- where the one line of meaning comes from -----------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())


def docstring_entries(doc: str | None) -> dict[str, str]:
    """``name -> text`` from a Google-style ``Fields:`` or ``Args:`` section of ``doc``."""
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    header: int | None = None      # the section header's indent while inside a section
    entry: int | None = None       # the entries' indent
    name = None
    for i, line in enumerate(lines):
        depth = len(line) - len(line.lstrip())
        if line.strip() in ("Fields:", "Args:"):
            # a docstring that opens with the header has its entries dedented to depth 0
            header, entry, name = (depth if i else -1), None, None
        elif header is None or not line.strip():
            continue
        elif depth <= header:
            header = None
        elif (entry is None or depth == entry) and (m := re.match(r"\s*(\w+):\s*(.*)", line)):
            entry, name = depth, m[1]
            out[name] = m[2]
        elif name is not None:
            out[name] += " " + line.strip()
    return {k: _one_line(v) for k, v in out.items()}


def source_comments(cls: type) -> dict[str, str]:
    """``field -> comment`` from the source of dataclass ``cls``: the block of comment lines
    right above the declaration, then the comment ending it (joined by ``;``)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not lines[n - 1].lstrip().startswith("#")]
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = "; ".join(part for part in (" ".join(above), " ".join(trailing)) if part)
        if text:
            out[node.target.id] = _one_line(text)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The one line of meaning of every field of dataclass ``cls`` ('' where it has none)."""
    entries, comments = docstring_entries(cls.__doc__), source_comments(cls)
    return {f.name: f.metadata.get("doc") or entries.get(f.name) or comments.get(f.name, "")
            for f in dataclasses.fields(cls)}


# --- how a type, a default and a range are written -------------------------------------------
def type_name(tp: Any) -> str:
    """``int``, ``float or null``, ``float or 'schedule'``, ``list[str]``; a ``Literal`` is
    its values (:func:`dataclass_rows` writes a field that is one ``Literal`` as ``str`` and
    lists the values under allowed)."""
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is None and isinstance(tp, type):
        return tp.__name__
    return re.sub(r"\b(typing|collections\.abc|torch)\.", "", str(tp)).replace("NoneType", "null")


def yaml_value(value: Any) -> str:
    """``value`` as it is written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{yaml_value(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{yaml_value(f.default_factory())}`"
    return "required"


def allowed(key: str, tp: Any, f: dataclasses.Field | None) -> str:
    """Literal choices, the registry's names, or the declared bounds (with what null means)."""
    parts = [_choices()[key]] if key in _choices() else []
    literal = [a for a in ([tp] + list(get_args(tp))) if get_origin(a) is Literal]
    if literal and not parts:
        parts.append(_names(get_args(literal[0])))
    limits = f.metadata.get("bounds", UNBOUNDED) if f is not None else UNBOUNDED
    if limits.rule():
        each = " each" if limits.length is None and get_origin(tp) is list else ""
        exactly = f"{limits.length} numbers, each " if limits.length else ""
        parts.append(exactly + limits.rule() + each)
    if limits.null:
        parts.append(f"null: {limits.null}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    """``text`` for a Markdown table cell: reST literals and roles become code spans."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text.replace("``", "`"))
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def dataclass_rows(section: str, cls: type) -> list[tuple[str, ...]]:
    """One row per field of ``cls``: key, type, default, allowed values, meaning."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        tp = hints[f.name]
        rows.append((f"`{key}`", "str" if get_origin(tp) is Literal else type_name(tp),
                     default_of(f),
                     allowed(key, tp, f), docs[f.name]))
    return rows


def summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s own docstring, on one line, in Markdown."""
    first = _one_line((obj.__doc__ and inspect.cleandoc(obj.__doc__) or "").split("\n\n")[0])
    generated = first.startswith(f"{getattr(obj, '__name__', '')}(")   # a dataclass's own
    return "" if generated or first.startswith("Args:") else _cell(first).replace("\\|", "|")


def registry_lines(registry: Registry, where: str, positional: int) -> list[str]:
    """A heading per registered name, then its options from its constructor's signature."""
    out: list[str] = []
    for name in registry.names():
        fn = registry.get(name)
        names, open_ended = accepted_options(fn, positional)
        names = [n for n in names if n not in getattr(registry, "reserved", ())]
        hints, entries = option_types(fn), docstring_entries(fn.__doc__)
        for base in fn.__mro__ if inspect.isclass(fn) else ():   # inherited options too
            entries = {**docstring_entries(base.__init__.__doc__),
                       **docstring_entries(base.__doc__), **entries}
        parameters = inspect.signature(fn).parameters
        out += ["", f"#### `{name}`", ""]
        if summary(fn):
            out += [summary(fn), ""]
        if not names:
            out.append("Takes no options." if not open_ended else "Takes any keyword options.")
            continue
        rows = []
        for n in names:
            default = parameters[n].default
            rows.append((f"`{where}.{n}`", type_name(hints.get(n, Any)),
                         "required" if default is inspect.Parameter.empty
                         else f"`{yaml_value(default)}`", "", entries.get(n, "")))
        out += _table(rows)
    return out


def run_config_rows() -> list[tuple[str, ...]]:
    hints, docs = typing.get_type_hints(RunConfig), field_docs(RunConfig)
    return [(f"`{f.name}`", type_name(hints[f.name]).replace(
                "polytask.core.data.tasks.", ""), default_of(f) if not dataclasses.is_dataclass(
                hints[f.name]) else "see below", "", docs[f.name])
            for f in dataclasses.fields(RunConfig)]


def render() -> str:
    """The whole of ``docs/config.md``."""
    lines = [
        "# Configuration reference", "",
        f"Generated from the typed config classes by `{COMMAND}`; do not edit by hand (a test "
        "fails when this file is stale). A run config is one YAML file of the sections below; "
        "every key may also be given on the command line as a dotted override "
        "(`train.lr=1e-3`). An unknown key, a value of the wrong type or one outside its "
        "allowed range is an error naming the key. `polytask train CONFIG --print-config` "
        "shows a config with every default filled in.", "",
        "An ablation config (`polytask ablate`) adds `grid:` (dotted keys -> lists of values) "
        "and `seeds:` (a list of seeds) to these sections.", "",
        "## Sections", ""]
    lines += _table(run_config_rows())
    for section, cls in SECTIONS:
        lines += ["", f"## `{section}` ({cls.__name__})", ""]
        if summary(cls):
            lines += [summary(cls), ""]
        lines += _table(dataclass_rows(section, cls))
        if section == "sharing":
            lines += ["", "### `sharing.adapters`: per-task LoRA on the shared backbone", "",
                      "`sharing.adapters: {per: task, r: 8}` (with `hard`, `mmoe` or `ple`); "
                      "empty: no adapters.", ""]
            lines += _table(dataclass_rows("sharing.adapters", TaskAdapterOptions))
        if section == "weighting":
            lines += ["", "### Weighting methods and their `weighting.options`", "",
                      "`gradient_reducer` is set by the training loop and cannot be given."]
            lines += registry_lines(WEIGHTINGS, "weighting.options", positional=1)
        if section == "train":
            lines += ["", "### `train.peft` methods and their options", "",
                      "`train.peft: {method: lora, r: 8}` names a method and its options."]
            for method, options_cls in PEFT_OPTIONS.items():
                lines += ["", f"#### `{method}`", ""]
                if summary(options_cls):
                    lines += [summary(options_cls), ""]
                if dataclasses.fields(options_cls):
                    lines += _table(dataclass_rows("train.peft", options_cls))
    lines += ["", "## `losses`", "",
              "`losses: {NAME: {option: value}}` passes options to a loss; NAME is a task's name "
              "(that task's options) or a registered loss's name (every task using it). The "
              "registered losses and their options:"]
    lines += registry_lines(LOSSES, "losses.NAME", positional=0)
    lines += ["", "## A pretraining config (`polytask pretrain`)", "",
              "Sections `model:` (as above), `pretrain:`, `data:` (below), `train:` (as above, "
              "without the fine-tuning keys: peft, train_top_layers, train_only, save_base, "
              "early stopping, generation_max_tokens) and `init:` (a pretraining run to "
              "continue from; its model and tokenizer are reused)."]
    for section, cls in (("pretrain", PretrainSection), ("data", PretrainDataConfig)):
        lines += ["", f"### `{section}` ({cls.__name__})", ""]
        lines += _table(dataclass_rows(section, cls))
    return "\n".join(lines) + "\n"


def main() -> int:
    print(render(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
