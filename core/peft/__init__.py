"""Parameter-efficient fine-tuning: one entry point, :func:`apply_peft`.

Methods (each freezes every parameter it does not add or name):
    lora     LoRA on linear layers matched by name (Hu et al. 2021)         :mod:`.lora`
    adapter  bottleneck adapters after ``out_proj`` and ``wo``
             (Houlsby et al. 2019)                                          :mod:`.adapters`
    prompt   learned prefix embeddings (Lester et al. 2021); the model must
             first be wrapped: ``model = PromptTuning(model, n_tokens)``    :mod:`.prompt`
    bitfit   train only the bias terms (Ben Zaken, Ravfogel & Goldberg 2022)
    full     train everything (the baseline the others are compared with)

Example::

    model = EncoderDecoder(config)
    trainable = apply_peft(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

Frozen parameters get ``requires_grad=False``, so they never receive a gradient and
optimizers skip them (AdamW's weight decay included: it only touches parameters that have a
gradient). Module patterns match a module's own name (``"q_proj"``) or, with shell wildcards,
its full dotted name (``"decoder.layers.*.self_attn.q_proj"``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from polytask.core.peft.adapters import AdaptedLinear, BottleneckAdapter
from polytask.core.peft.lora import LoRALinear, merge_lora, unmerge_lora, unwrap_lora
from polytask.core.peft.prompt import PromptTuning

__all__ = ["apply_peft", "PEFT_METHODS", "trainable_parameter_names", "LoRALinear", "merge_lora",
           "unmerge_lora", "unwrap_lora", "AdaptedLinear", "BottleneckAdapter", "PromptTuning"]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == p or fnmatchcase(name, p) for p in patterns)


def _replace_linears(model: nn.Module, patterns: Sequence[str],
                     wrap: Callable[[nn.Linear], nn.Module]) -> list[str]:
    """Replace every ``nn.Linear`` whose name matches ``patterns`` by ``wrap(linear)``;
    returns the replaced names. A module already wrapped is not wrapped again."""
    if isinstance(patterns, str):
        patterns = [patterns]
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.Linear and _matches(name, patterns)]
    if not targets:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches {list(patterns)}; linear module names in the "
                         f"model: {', '.join(linears)}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrap(getattr(parent, child)))
    return targets


def _freeze_all_but(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> list[str]:
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))
        if p.requires_grad:
            names.append(name)
    return names


def _lora(model: nn.Module, targets: Sequence[str] = ("q_proj", "v_proj"), r: int = 8,
          alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    _replace_linears(model, targets, lambda lin: LoRALinear(lin, r=r, alpha=alpha,
                                                            dropout=dropout))
    return _freeze_all_but(model, lambda n, _: n.endswith(("lora_A", "lora_B")))


def _adapter(model: nn.Module, targets: Sequence[str] = ("out_proj", "wo"),
             bottleneck: int = 64, activation: str = "gelu") -> list[str]:
    _replace_linears(model, targets, lambda lin: AdaptedLinear(lin, bottleneck, activation))
    return _freeze_all_but(model, lambda n, _: ".adapter." in f".{n}")


def _prompt(model: nn.Module) -> list[str]:
    if not isinstance(model, PromptTuning):
        raise ValueError("prompt tuning wraps the model: call "
                         "apply_peft(PromptTuning(model, n_tokens), 'prompt'); got "
                         f"{type(model).__name__}")
    return _freeze_all_but(model, lambda n, _: n == "prompt")


def _bitfit(model: nn.Module) -> list[str]:
    # Every bias term: attention and feed-forward projections and the norms' shifts, as in
    # Ben Zaken et al. (their section 2 trains "all bias terms").
    names = _freeze_all_but(model, lambda n, _: n == "bias" or n.endswith(".bias"))
    if not names:
        raise ValueError("bitfit found no bias parameters (e.g. model.bias = false, as in T5)")
    return names


def _full(model: nn.Module) -> list[str]:
    return _freeze_all_but(model, lambda n, _: True)


PEFT_METHODS: dict[str, Callable[..., list[str]]] = {
    "lora": _lora, "adapter": _adapter, "prompt": _prompt, "bitfit": _bitfit, "full": _full,
}
_OPTIONS = {"lora": ("targets", "r", "alpha", "dropout"),
            "adapter": ("targets", "bottleneck", "activation"),
            "prompt": (), "bitfit": (), "full": ()}


def apply_peft(model: nn.Module, method: str, **options: Any) -> list[str]:
    """Make ``model`` parameter-efficient in place and return the trainable parameter names.

    Args:
        model: the model to adapt (for ``prompt``: a :class:`PromptTuning` wrapper).
        method: one of :data:`PEFT_METHODS` (module docstring).
        options: ``lora``: ``targets`` (module-name patterns, default q_proj, v_proj), ``r``
            (8), ``alpha`` (16), ``dropout`` (0); ``adapter``: ``targets`` (out_proj, wo),
            ``bottleneck`` (64), ``activation`` (gelu). Unknown options raise ``ValueError``.

    Returns:
        names (as in ``model.named_parameters()``) of the parameters left trainable; every
        other parameter has ``requires_grad=False``.
    """
    if method not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; choices: {', '.join(PEFT_METHODS)}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        allowed = ", ".join(_OPTIONS[method]) or "none"
        raise ValueError(f"unknown option(s) {unknown} for PEFT method {method!r}; "
                         f"options: {allowed}")
    return PEFT_METHODS[method](model, **options)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad=True``."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
