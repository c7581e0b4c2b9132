"""Where PEFT acts: a model's *backbone*, and swapping one module for another everywhere it is
held.

The backbone of a plain :class:`polytask.core.model.transformer.EncoderDecoder` is the model.
A multi-task model (anything with ``columns()``, the task views in task order, as
:class:`polytask.heads.model.MultiTaskModel` has) runs each task through an EncoderDecoder
view whose modules are the shared, group or private modules of the sharing plan; those views
are its backbone. What lies outside them — classifier and rank heads, the adversarial
discriminator, cross-stitch units — is new, randomly initialised, and not PEFT's business.

The views are not registered submodules of the multi-task model (each shared module is
registered once, in its plan slot) but they *hold* the slot modules, so a wrapper must be
installed in both places: :func:`replace_module` does that.
"""
from __future__ import annotations

from torch import nn


def task_views(model: nn.Module) -> list[nn.Module]:
    """The task views of a multi-task model (``model.columns()``), or ``[]`` for a plain one."""
    columns = getattr(model, "columns", None)
    return list(columns()) if callable(columns) else []


def backbone(model: nn.Module) -> list[nn.Module]:
    """The modules PEFT adapts and freezes: a multi-task model's task views, else the model."""
    return task_views(model) or [model]


def backbone_modules(model: nn.Module) -> set[int]:
    """``id`` of every module inside the backbone."""
    return {id(m) for root in backbone(model) for m in root.modules()}


def backbone_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter inside the backbone."""
    return {id(p) for root in backbone(model) for p in root.parameters()}


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Make every module that holds ``old`` as a child — in ``model``'s tree or in one of its
    task views — hold ``new`` instead; returns how many places changed (0: ``old`` is not in
    the model). ``new`` may wrap ``old`` (as ``new.base``)."""
    holders = {id(m): m for root in [model, *task_views(model)] for m in root.modules()}
    changed = 0
    for holder in holders.values():
        for name, child in list(holder._modules.items()):  # every name, duplicates too
            if child is old:
                setattr(holder, name, new)
                changed += 1
    return changed


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable": ..., "total": ...}``: elements of the model's parameters, each tensor
    counted once however many modules share it (tied embeddings, shared layers)."""
    params = list(model.parameters())  # deduplicated by identity
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params)}


def describe_counts(counts: dict[str, int]) -> str:
    """``trainable 12,345 of 1,234,567 parameters (1.0%)``."""
    trainable, total = counts["trainable"], counts["total"]
    share = 100.0 * trainable / total if total else 0.0
    percent = f"{share:.1f}" if share >= 0.1 or share == 0 else f"{share:.1g}"
    return f"trainable {trainable:,} of {total:,} parameters ({percent}%)"
