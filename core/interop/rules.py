"""Shared helpers of the T5 and BART name maps: regex renaming rules and HF config values."""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def apply_rules(rules: Sequence[Rule], name: str) -> str | None:
    """Our name for Hugging Face tensor ``name`` by the first matching rule, or None."""
    for pattern, target in rules:
        m = pattern.fullmatch(name)
        if m:
            return target(m)
    return None


def first(value: Any) -> Any:
    """HF configs store some token ids as a list (several eos ids): take the first."""
    return value[0] if isinstance(value, (list, tuple)) else value
