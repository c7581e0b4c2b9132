"""Name -> constructor registries for losses and task weightings.

A run config names its losses (``TaskSpec.loss``) and its weighting (``weighting.method``) by
the names registered here; nothing is imported by string. An experiment script adds its own
loss without touching the library::

    from polytask import losses

    @losses.register("focal")
    class FocalLoss(nn.Module):
        ...

    criterion = losses.get("focal")(gamma=2.0)

Options from a config go through :meth:`Registry.build` (or :meth:`Registry.check_options`
alone): the accepted options are read from the constructor's signature and their types from
its annotations, so a misspelt or mistyped option of any registered class is one line naming
the key and the accepted ones, with no per-class code::

    losses.WEIGHTINGS.build("gradnorm", names, options={"alpah": 1.5}, where="weighting.options")
    # ValueError: weighting.options.alpah is not an option of weighting 'gradnorm';
    #             accepted: alpha, lr, min_weight
"""
from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Generic, TypeVar

from torch import nn

from polytask.core.model.fields import check_value, short_repr

T = TypeVar("T", bound=Callable)


def accepted_options(fn: Callable, positional: int = 0) -> tuple[list[str], bool]:
    """The keyword options ``fn`` (a class or function) takes after its first ``positional``
    arguments, and whether it also takes any keyword (``**kwargs``)."""
    names, skipped, open_ended = [], 0, False
    if inspect.isclass(fn) and fn.__init__ in (object.__init__, nn.Module.__init__):
        return names, open_ended   # no constructor of its own: no options (Module's **kwargs)
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
        elif p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD
                                               and skipped < positional):
            skipped += 1
        elif p.kind is not p.VAR_POSITIONAL:
            names.append(p.name)
    return names, open_ended


def option_types(fn: Callable) -> dict[str, Any]:
    """Parameter name -> annotation of ``fn``'s constructor (or of ``fn``), resolved; empty
    where the annotations cannot be resolved (then only names are checked)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except (NameError, TypeError, AttributeError):   # e.g. a name its module lacks
        return {}


class Registry(Generic[T]):
    """A small name -> callable table that refuses duplicates and explains misses.

    Args:
        kind: what is registered ("loss", "weighting"); used in error messages only.
        reserved: constructor arguments the code always supplies and a config never may (the
            weightings' ``gradient_reducer``, set by the training loop).
    """

    def __init__(self, kind: str, reserved: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.reserved = tuple(reserved)
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` above a class or factory function."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def decorate(obj: T) -> T:
            if name in self._entries:
                # Silently replacing a built-in would make a config mean different code
                # depending on import order.
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered "
                    f"(by {getattr(self._entries[name], '__qualname__', self._entries[name])}); "
                    f"pick another name")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The callable registered under ``name``; ``ValueError`` listing known names if none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def check_options(self, name: str, options: Any, where: str, *, positional: int = 0,
                      reserved: tuple[str, ...] = ()) -> dict[str, Any]:
        """``options`` for ``get(name)`` after ``positional`` arguments, checked against its
        signature: each key must be a parameter (unless it takes ``**kwargs``) and not one of
        ``reserved`` or the registry's (set by the code, not a config), and each value must
        have the annotated type, with floats finite. ``where`` is the config key of
        ``options`` (``weighting.options``) in the one-line ``ValueError``. Returns the
        options, ints made floats where floats are wanted."""
        fn = self.get(name)
        if not isinstance(options, dict):
            raise ValueError(f"{where} = {short_repr(options)} is invalid: expected a mapping "
                             f"of option names to values")
        accepted, open_ended = accepted_options(fn, positional)
        reserved = self.reserved + tuple(reserved)
        accepted = [n for n in accepted if n not in reserved]
        types = option_types(fn)
        checked = {}
        for key, value in options.items():
            if key in reserved:
                raise ValueError(f"{where}.{key} cannot be set in a config: the code that builds "
                                 f"the {self.kind} sets it")
            if key not in accepted and not open_ended:
                raise ValueError(f"{where}.{key} is not an option of {self.kind} {name!r}; "
                                 f"accepted: {', '.join(accepted) or 'none'}")
            checked[key] = check_value(f"{where}.{key}", value, types.get(key, Any))
        return checked

    def build(self, name: str, *args: Any, options: dict[str, Any] | None = None, where: str,
              **fixed: Any) -> Any:
        """``get(name)(*args, **options, **fixed)`` with ``options`` from a config checked by
        :meth:`check_options` (``fixed``: keywords the code supplies, which a config may not).
        A ``TypeError`` or ``ValueError`` the constructor raises about a value becomes one
        ``ValueError`` line naming ``where``, the registered name and the options given
        (``--debug`` shows the original as its cause)."""
        checked = self.check_options(name, options or {}, where, positional=len(args),
                                     reserved=tuple(fixed))
        try:
            return self.get(name)(*args, **checked, **fixed)
        except (TypeError, ValueError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{where} = {short_repr(checked)} rejected by {self.kind} "
                             f"{name!r}: {message}") from err

    def __contains__(self, name: object) -> bool:
        return name in self._entries


LOSSES: Registry = Registry("loss")
WEIGHTINGS: Registry = Registry("weighting", reserved=("gradient_reducer",))

register = LOSSES.register
get = LOSSES.get
register_weighting = WEIGHTINGS.register
get_weighting = WEIGHTINGS.get
