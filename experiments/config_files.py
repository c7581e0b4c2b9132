"""Reading config files: a safe YAML loader and dotted ``section.key=value`` overrides.

:func:`yaml_load` is ``yaml.safe_load`` plus floats written without a dot (``1e-3``), with a
key given twice in a mapping, nesting deeper than :data:`MAX_DEPTH` and aliases expanding past
:data:`MAX_VALUES` values refused at their line. :func:`load_yaml` reads a file's mapping,
:func:`parse_overrides` and :func:`apply_overrides` turn ``train.max_steps=50`` into a changed
copy of it. The typed sections they feed are :mod:`polytask.experiments.config`'s.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from polytask.core.model.fields import short_repr

#: the run config's top-level sections (:class:`polytask.experiments.config.RunConfig`)
SECTIONS = ("model", "tasks", "sharing", "weighting", "losses", "data", "train", "init", "stages",
            "continual")


#: a config is a few hundred values; these bound what YAML aliases and nesting can make of it
MAX_VALUES = 100_000
MAX_DEPTH = 50


class _Loader(yaml.SafeLoader):
    """Safe YAML, plus floats written without a dot (``1e-3``), which YAML 1.1 reads as text;
    a key given twice in one mapping and nesting deeper than :data:`MAX_DEPTH` are errors at
    their line (PyYAML would keep the last value, and recurse until ``RecursionError``)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], Any] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue   # merge keys (<<: *base) may be overridden: that is what they are for
            if (key.tag, key.value) in first:
                raise yaml.composer.ComposerError(
                    None, None, f"duplicate key {key.value!r}; first at line "
                    f"{first[key.tag, key.value].start_mark.line + 1}", key.start_mark)
            first[key.tag, key.value] = key
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|"""
               r"""^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$|"""
               r"""^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$""", re.X),
    list("-+0123456789."))


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values of a composed document, an alias each time it is used (what copying
    the loaded data costs): a "billion laughs" document of nested aliases is refused, at the
    line of the top-level entry whose value passes :data:`MAX_VALUES`, in at most that many
    steps."""
    top = [part for pair in root.value for part in pair] if isinstance(
        root, yaml.MappingNode) else [root]
    stack, count = [(n, n.start_mark) for n in top], 1
    while stack:
        node, mark = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"the document expands to more than {MAX_VALUES:,} values, "
                "counting each use of an alias (*name) anew", mark)
        if isinstance(node, yaml.MappingNode):
            stack.extend((part, mark) for pair in node.value for part in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, mark) for item in node.value)


def yaml_load(text: str) -> Any:
    """Parse one YAML document with :class:`_Loader`, refusing duplicate keys, deep nesting
    and alias bombs (``yaml.YAMLError`` with the line)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def plain_copy(data: Any, where: str = "config") -> Any:
    """A deep copy of nested dicts and lists (tuples become lists, other values are shared),
    with each use of a shared part copied on its own. Data bigger than :data:`MAX_VALUES`
    once expanded, or deeper than :data:`MAX_DEPTH`, raises ``ValueError`` naming ``where``
    first, so an alias bomb cannot make the copy run for ever."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ValueError(f"{where}: more than {MAX_VALUES:,} values once YAML aliases are "
                             "expanded (each use of an alias counts anew); a config never "
                             "needs that many")
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((part, depth + 1) for pair in value.items() for part in pair)
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1) for item in value)

    def copy(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(v) for v in value]
        return value
    return copy(data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "sharing.strategy=soft"]`` -> ``{"train.lr": 0.001, ...}``; values
    are YAML (with :func:`yaml_load`'s checks). A key given again replaces its earlier value,
    so a script can add overrides to a list of defaults."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise ValueError(f"override {short_repr(item)} must look like section.key=value")
        try:
            out[key] = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {short_repr(item)}: cannot parse value "
                             f"({getattr(e, 'problem', None) or e})") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any],
                    sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy: :func:`plain_copy`, so the size limits hold
    for data not read by :func:`yaml_load` too); the first part of a key must be one of
    ``sections`` (a run config's by default). Unknown keys are caught by ``from_dict``."""
    data = plain_copy(data)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for i, p in enumerate(parents):
            if p not in sections and i == 0:
                raise ValueError(f"unknown config section {p!r} in override {dotted!r}; "
                                 f"known: {', '.join(sections)}")
            if node.get(p) is None:   # an empty section (``train:`` and nothing under it)
                node[p] = {}
            nxt = node[p]
            if not isinstance(nxt, dict):
                raise ValueError(f"override {dotted!r}: {'.'.join(parents[:i + 1])} is not a section")
            node = nxt
        if not parents and leaf not in sections:
            raise ValueError(f"unknown config section {leaf!r}; known: {', '.join(sections)}")
        node[leaf] = plain_copy(value, f"override {dotted}")
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file ``path``; any problem is one ``ValueError`` line naming the
    file, and the line where the YAML has one (:func:`yaml_load`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or e})"
                         ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections")
    return data
