"""The strict dict -> dataclass loader every config section uses: a wrong key or value fails
loudly, naming the key, the value and the choices.

A field declares its allowed range next to its default, where a reader looks for it::

    lr: float = field(default=3e-4, metadata=bounds(gt=0))
    grad_clip: float | None = field(default=1.0, metadata=bounds(gt=0, null="no clipping"))

and :func:`check_fields` enforces it (``train.grad_clip = -1.0 must be positive (or null: no
clipping)``). Every float must be finite unless its field says ``bounds(allow_inf=True)``: a
``nan`` learning rate or task weight would otherwise train silently on garbage.
"""
from __future__ import annotations

import math
import reprlib
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


def _type_ok(value: Any, tp: Any) -> bool:
    """``value`` has type ``tp``, element by element for ``list[X]``, ``tuple[X, ...]`` and
    ``dict[K, V]`` (so ``betas: [a, b]`` is refused here, not deep inside the optimizer)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        items = [a for a in get_args(tp) if a is not Ellipsis]
        return not items or all(_type_ok(v, items[0]) for v in value)
    if origin is dict:
        args = get_args(tp)
        return isinstance(value, dict) and (not args or all(
            _type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items()))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def describe_type(tp: Any) -> str:
    """``one of 'a', 'b'`` for a Literal, ``float or null`` for a union, else the type as
    written (``list[float]``)."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 60, 60, 8, 8


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to one short line for error messages (a long list shows ``...``)."""
    return _short.repr(value)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field, or of every item of a list field (``length``:
    exactly that many items). ``null`` says what ``None`` means, for the message, when the
    field's type allows it. Build it with :func:`bounds`."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    allow_inf: bool = False
    null: str | None = None
    length: int | None = None

    def rule(self) -> str:
        """``positive``, ``>= 0``, ``in [0, 1)``, ... ('' when unbounded)."""
        low, high = (self.gt, self.ge), (self.lt, self.le)
        lo = next((x for x in low if x is not None), None)
        hi = next((x for x in high if x is not None), None)
        if lo is not None and hi is not None:
            return (f"in {'(' if self.gt is not None else '['}{_number(lo)}, {_number(hi)}"
                    f"{')' if self.lt is not None else ']'}")
        if self.gt == 0:
            return "positive"
        for op, x in (("> ", self.gt), (">= ", self.ge), ("< ", self.lt), ("<= ", self.le)):
            if x is not None:
                return op + _number(x)
        return ""

    def problem(self, x: float) -> str | None:
        """Why number ``x`` is out of range (``must be ...``), or None if it is not."""
        rule = self.rule()
        if isinstance(x, float) and (math.isnan(x) or (math.isinf(x) and not self.allow_inf)):
            return "must be finite" + (f" and {rule}" if rule else "")
        inside = ((self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                  and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))
        return None if inside else f"must be {rule}"

    def note(self) -> str:
        return f" (or null: {self.null})" if self.null else ""


UNBOUNDED = Bounds()


def bounds(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, allow_inf: bool = False, null: str | None = None,
           length: int | None = None) -> dict[str, Bounds]:
    """Field metadata declaring a range: ``field(default=0.1, metadata=bounds(ge=0, lt=1))``.

    ``gt``/``ge`` and ``lt``/``le`` are the open/closed lower and upper ends; ``allow_inf``
    lets a float field hold +-inf (nan never); ``null`` explains ``None`` in the message;
    ``length`` makes a list field hold exactly that many items, each within the range.
    """
    if (gt is not None and ge is not None) or (lt is not None and le is not None):
        raise TypeError("bounds: give at most one of gt/ge and one of lt/le")
    return {"bounds": Bounds(gt, ge, lt, le, allow_inf, null, length)}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _float_allowed(tp: Any) -> bool:
    return tp is float or float in get_args(tp)


def check_value(key: str, value: Any, tp: Any, limits: Bounds = UNBOUNDED) -> Any:
    """``value`` checked against type ``tp`` and ``limits`` (``key`` names it in the message);
    returns it with ints made floats where ``tp`` wants floats (``lr: 1`` -> ``1.0``).

    Raises ``ValueError``: ``train.lr = 'fast' is invalid: expected float``,
    ``train.lr = nan must be finite and positive``, ``train.betas[1] = 1.0 must be in [0, 1)``.
    """
    if not _type_ok(value, tp):
        raise ValueError(f"{key} = {short_repr(value)} is invalid: expected {describe_type(tp)}")
    if value is None:
        return value
    if _is_number(value):
        if isinstance(value, int) and _float_allowed(tp) and int not in get_args(tp):
            value = float(value)
        problem = limits.problem(value)
        if problem:
            raise ValueError(f"{key} = {value!r} {problem}{limits.note()}")
        return value
    if isinstance(value, (list, tuple)):
        listed = _arm(tp, (list, tuple))
        items = [a for a in get_args(listed) if a is not Ellipsis] if listed is not None else []
        if limits.length is not None and len(value) != limits.length:
            each = f", each {limits.rule()}" if limits.rule() else ""
            raise ValueError(f"{key} = {short_repr(value)} must hold exactly {limits.length} "
                             f"numbers{each}")
        out = [check_value(f"{key}[{i}]", v, items[0] if items else Any, limits)
               if _is_number(v) else v for i, v in enumerate(value)]
        return type(value)(out)
    mapping = _arm(tp, (dict,))
    if isinstance(value, dict) and mapping is not None and get_args(mapping):
        values_tp = get_args(mapping)[1]
        if _float_allowed(values_tp):
            return {k: check_value(f"{key}.{k}", v, values_tp) for k, v in value.items()}
    return value


def _arm(tp: Any, origins: tuple[type, ...]) -> Any:
    """The member of union ``tp`` (or ``tp`` itself) whose origin is one of ``origins``."""
    members = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return next((a for a in members if get_origin(a) in origins), None)


def check_fields(obj: Any, section: str) -> None:
    """Raise ``ValueError`` if a field of dataclass ``obj`` has a value outside its type or its
    declared :func:`bounds` (and any float that is not finite); ints in float fields become
    floats. ``section`` prefixes the key in messages (``train`` -> ``train.lr``)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        checked = check_value(f"{section}.{f.name}", value, hints[f.name],
                              f.metadata.get("bounds", UNBOUNDED))
        if checked is not value:
            setattr(obj, f.name, checked)


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ValueError`` listing the known."""
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"config section {section or cls.__name__} must be a mapping of keys to "
                         f"values, got {type(data).__name__} {short_repr(data)}")
    data = dict(data or {})
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{section}." if section else ""
        raise ValueError(
            f"unknown config key {where}{unknown[0]}; known keys: {', '.join(names)}")
    return cls(**data)
