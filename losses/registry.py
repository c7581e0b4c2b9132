"""Name -> constructor registries for losses and task weightings.

A run config names its losses (``TaskSpec.loss``) and its weighting (``weighting.method``) by
the names registered here; nothing is imported by string. An experiment script adds its own
loss without touching the library::

    from polytask import losses

    @losses.register("focal")
    class FocalLoss(nn.Module):
        ...

    criterion = losses.get("focal")(gamma=2.0)
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A small name -> callable table that refuses duplicates and explains misses.

    Args:
        kind: what is registered ("loss", "weighting"); used in error messages only.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
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

    def __contains__(self, name: object) -> bool:
        return name in self._entries


LOSSES: Registry = Registry("loss")
WEIGHTINGS: Registry = Registry("weighting")

register = LOSSES.register
get = LOSSES.get
register_weighting = WEIGHTINGS.register
get_weighting = WEIGHTINGS.get
