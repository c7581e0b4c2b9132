"""Parameter-efficient fine-tuning: one entry point, :func:`apply_peft`.

Methods (each freezes every *backbone* parameter it does not add or name):
    lora     LoRA on linear layers matched by name (Hu et al. 2021)         :mod:`.lora`
    adapter  bottleneck adapters after ``out_proj`` and ``wo``
             (Houlsby et al. 2019)                                          :mod:`.adapters`
    prompt   virtual tokens prepended to every source (Lester et al. 2021),
             per task or shared                                             :mod:`.prompt`
    bitfit   train only the bias terms (Ben Zaken, Ravfogel & Goldberg 2022)
    full     train everything (the baseline the others are compared with)

Options per method: :mod:`.options` (an unknown option raises, listing the accepted ones).

The backbone (:mod:`.modules`) is the model itself for an EncoderDecoder and the task views of
a multi-task model; what lies outside it — classifier and rank heads, the adversarial
discriminator, cross-stitch units, all new and randomly initialised — keeps its
``requires_grad``, so it trains unless the caller freezes it.

Example::

    model = EncoderDecoder(config)
    trainable = apply_peft(model, "lora", targets=["q_proj", "v_proj"], r=8, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    print(describe_counts(parameter_counts(model)))   # trainable 4,096 of ... parameters (..%)

Frozen parameters get ``requires_grad=False``, so they never receive a gradient and
optimizers skip them (AdamW's weight decay included: it only touches parameters that have a
gradient). Module patterns match a module's own name (``"q_proj"``) or, with shell wildcards,
its full dotted name (``"decoder.layers.*.self_attn.q_proj"``; in a multi-task model
``"slots.decoder_*.*.self_attn.q_proj"``). For inference and export, :func:`merge_lora` folds
LoRA into the base weights and :func:`unwrap_lora` also restores the plain module tree;
adapters and prompts have nothing to fold.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from polytask.core.peft.adapters import AdaptedLinear, BottleneckAdapter
from polytask.core.peft.lora import LoRALinear, merge_lora, unmerge_lora, unwrap_lora
from polytask.core.peft.modules import (backbone_modules, backbone_parameters, describe_counts,
                                        parameter_counts, replace_module)
from polytask.core.peft.options import (AdapterOptions, LoRAOptions, NoOptions, PromptOptions,
                                        peft_options)
from polytask.core.peft.prompt import PromptEmbedding, prompt_tune

__all__ = ["apply_peft", "PEFT_METHODS", "peft_options", "trainable_parameter_names",
           "parameter_counts", "describe_counts", "LoRALinear", "merge_lora", "unmerge_lora",
           "unwrap_lora", "AdaptedLinear", "BottleneckAdapter", "PromptEmbedding", "prompt_tune"]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == p or fnmatchcase(name, p) for p in patterns)


def _replace_linears(model: nn.Module, patterns: Sequence[str],
                     wrap: Callable[[nn.Linear], nn.Module]) -> list[str]:
    """Replace every backbone ``nn.Linear`` whose name matches ``patterns`` by
    ``wrap(linear)``, wherever it is held; returns the replaced names. A module already
    wrapped is not wrapped again."""
    inside = backbone_modules(model)
    linears = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and id(m) in inside]
    targets = [(name, m) for name, m in linears if _matches(name, patterns)]
    if not targets:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"no nn.Linear matches {list(patterns)}; linear module names in the "
                         f"model: {', '.join(leaves)}")
    for _, linear in targets:
        replace_module(model, linear, wrap(linear))
    return [name for name, _ in targets]


def _freeze_backbone_but(model: nn.Module, keep: Callable[[str], bool]) -> list[str]:
    """Set ``requires_grad = keep(name)`` on every backbone parameter (the rest keep theirs);
    returns the names of the backbone parameters kept."""
    inside = backbone_parameters(model)
    kept = []
    for name, p in model.named_parameters():
        if id(p) in inside:
            p.requires_grad_(keep(name))
            if p.requires_grad:
                kept.append(name)
    return kept


def _lora(model: nn.Module, o: LoRAOptions) -> list[str]:
    _replace_linears(model, o.targets, lambda lin: LoRALinear(lin, r=o.r, alpha=o.alpha,
                                                              dropout=o.dropout))
    return _freeze_backbone_but(model, lambda n: n.endswith(("lora_A", "lora_B")))


def _adapter(model: nn.Module, o: AdapterOptions) -> list[str]:
    _replace_linears(model, o.targets, lambda lin: AdaptedLinear(lin, o.bottleneck, o.activation))
    return _freeze_backbone_but(model, lambda n: ".adapter." in f".{n}")


def _prompt(model: nn.Module, o: PromptOptions) -> list[str]:
    prompt_tune(model, o.n_tokens, init_from_vocab=o.init_from_vocab, per_task=o.per_task)
    return _freeze_backbone_but(model, lambda n: n.rsplit(".", 1)[-1] == "prompt")


def _bitfit(model: nn.Module, o: NoOptions) -> list[str]:
    # Every bias term: attention and feed-forward projections and the norms' shifts, as in
    # Ben Zaken et al. (their section 2 trains "all bias terms").
    names = _freeze_backbone_but(model, lambda n: n == "bias" or n.endswith(".bias"))
    if not names:
        raise ValueError("bitfit found no bias parameters (e.g. model.bias = false, as in T5)")
    return names


def _full(model: nn.Module, o: NoOptions) -> list[str]:
    return _freeze_backbone_but(model, lambda n: True)


PEFT_METHODS: dict[str, Callable[[nn.Module, Any], list[str]]] = {
    "lora": _lora, "adapter": _adapter, "prompt": _prompt, "bitfit": _bitfit, "full": _full,
}


def apply_peft(model: nn.Module, method: str, **options: Any) -> list[str]:
    """Make ``model`` parameter-efficient in place and return what PEFT trains.

    Args:
        model: an EncoderDecoder, or a multi-task model (its task views are adapted: module
            docstring).
        method: one of :data:`PEFT_METHODS` (module docstring).
        options: the method's options (:mod:`.options`): ``lora``: ``targets`` (module-name
            patterns, default q_proj, v_proj), ``r`` (8), ``alpha`` (16), ``dropout`` (0);
            ``adapter``: ``targets`` (out_proj, wo), ``bottleneck`` (64), ``activation``
            (gelu); ``prompt``: ``n_tokens`` (20), ``init_from_vocab`` (true), ``per_task``
            (true). Unknown options raise ``ValueError`` listing the accepted ones.

    Returns:
        names (as in ``model.named_parameters()``) of the backbone parameters left trainable;
        every other backbone parameter has ``requires_grad=False``, and parameters outside the
        backbone are left as they were.
    """
    parsed = peft_options(method, options)  # raises for an unknown method or option
    return PEFT_METHODS[method](model, parsed)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad=True``."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
