"""The options of each PEFT method as a typed dataclass: an unknown option, or a value of the
wrong type or range (every float finite: :func:`polytask.core.model.fields.check_fields`),
fails naming it and the accepted options (YAML: ``train.peft``)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from polytask.core.model.fields import bounds, check_fields


def _check_targets(targets: str | list[str], where: str) -> list[str]:
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{where}.targets = {targets!r} is invalid: expected module names or "
                         f"patterns, e.g. [q_proj, v_proj]")
    return targets


@dataclass
class LoRAOptions:
    """``lora`` (Hu et al. 2021): the ``nn.Linear`` layers to adapt (``targets``: module names
    or wildcard patterns on full names), the rank ``r``, the scaling numerator ``alpha`` (the
    update is scaled by ``alpha / r``) and dropout on the update's input."""

    # Linear layers to adapt: module names or wildcard patterns
    targets: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    r: int = 8  # rank of the update
    # the update is scaled by alpha / r; 0 would scale every update to nothing
    alpha: float = field(default=16.0, metadata=bounds(gt=0))
    dropout: float = 0.0  # dropout on the update's input

    def check(self, where: str) -> None:
        self.targets = _check_targets(self.targets, where)
        if self.r <= 0:
            raise ValueError(f"{where}.r = {self.r} is invalid: the LoRA rank must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{where}.dropout = {self.dropout} is invalid: expected [0, 1)")


@dataclass
class AdapterOptions:
    """``adapter`` (Houlsby et al. 2019): the linear layers an adapter follows (``targets``,
    default every attention output and feed-forward output), its ``bottleneck`` width and
    ``activation``."""

    # Linear layers an adapter follows
    targets: str | list[str] = field(default_factory=lambda: ["out_proj", "wo"])
    bottleneck: int = 64  # adapter hidden width
    activation: Literal["relu", "gelu", "silu"] = "gelu"  # adapter activation

    def check(self, where: str) -> None:
        self.targets = _check_targets(self.targets, where)
        if self.bottleneck <= 0:
            raise ValueError(f"{where}.bottleneck = {self.bottleneck} is invalid: must be positive")


@dataclass
class PromptOptions:
    """``prompt`` (Lester et al. 2021, :mod:`polytask.core.peft.prompt`): ``n_tokens`` virtual
    tokens per prompt, initialised from the vocabulary's embeddings (``init_from_vocab``), one
    prompt per task (``per_task``) or one per shared token embedding."""

    n_tokens: int = 20  # virtual tokens per prompt
    init_from_vocab: bool = True  # initialise prompts from vocabulary embeddings
    per_task: bool = True  # one prompt per task (else one shared)

    def check(self, where: str) -> None:
        if self.n_tokens <= 0:
            raise ValueError(f"{where}.n_tokens = {self.n_tokens} is invalid: must be positive")


@dataclass
class NoOptions:
    """``bitfit`` and ``full`` take no options."""

    def check(self, where: str) -> None:
        pass


OPTIONS: dict[str, type] = {"lora": LoRAOptions, "adapter": AdapterOptions,
                            "prompt": PromptOptions, "bitfit": NoOptions, "full": NoOptions}


def peft_options(method: str, options: dict[str, Any], where: str = "peft") -> Any:
    """The validated options of ``method`` (a dataclass above); ``where`` names them in errors
    (``train.peft`` for a run config)."""
    if method not in OPTIONS:
        raise ValueError(f"{where}.method = {method!r} is invalid: unknown PEFT method; "
                         f"choices: {', '.join(OPTIONS)}")
    cls = OPTIONS[method]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)} for "
                         f"PEFT method {method!r}; options: {', '.join(known) or 'none'}")
    parsed = cls(**options)
    check_fields(parsed, where)
    parsed.check(where)
    return parsed
