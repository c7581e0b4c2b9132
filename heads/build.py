"""``build_model``: wire backbones, plan, heads and discriminator into a ``MultiTaskModel``.

The only place that reads the configs; :class:`polytask.heads.model.MultiTaskModel` receives its parts
(STYLE 4: compose, don't configure internals).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polytask.core.model.config import ModelConfig
from polytask.core.data.tasks import TaskSpec
from polytask.core.model.transformer import EncoderDecoder
from polytask.heads.classifier import ClassifierHead
from polytask.heads.config import SharingConfig
from polytask.heads.cross_stitch import CrossStitch
from polytask.heads.experts import MIXTURES, SlotTransform, mixture_transform
from polytask.heads.model import MultiTaskModel
from polytask.heads.task_adapters import TaskAdapterOptions, adapter_transform, freeze_backbone
from polytask.heads.plan import SharingPlan, make_plan
from polytask.heads.rank import RankHead
from polytask.heads.slots import get_slot, set_slot
from polytask.losses.adversarial import GradientReversal, TaskDiscriminator


def build_discriminator(sharing: SharingConfig, d_model: int, n_tasks: int) -> TaskDiscriminator:
    """Liu et al. (2017)'s task discriminator behind a gradient-reversal layer whose coefficient
    is ``sharing.grl_lambda`` (fixed) or Ganin & Lempitsky's schedule (``"schedule"``)."""
    if n_tasks < 2:
        raise ValueError(f"sharing.adversarial = true needs >= 2 tasks, got {n_tasks}")
    if sharing.grl_lambda == "schedule":
        grl = GradientReversal(1.0, schedule="ganin", gamma=sharing.grl_gamma)
    else:
        grl = GradientReversal(float(sharing.grl_lambda), schedule="fixed")
    return TaskDiscriminator(d_model, n_tasks, hidden=d_model, grl=grl)


def _as_task(t: TaskSpec | dict[str, Any]) -> TaskSpec:
    return t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t)


def build_model(model_config: ModelConfig | Any, tasks: list[TaskSpec] | None = None,
                sharing: SharingConfig | dict[str, Any] | None = None, *,
                pretrained: EncoderDecoder | None = None) -> MultiTaskModel:
    """``build_model(model_config, tasks, sharing)`` or ``build_model(run_config)`` (any object
    with ``.model``, ``.tasks`` and ``.sharing``).

    Every task gets a freshly initialised backbone (so ``none`` gives independent single-task
    models); ``soft`` then copies task 0's state into every copy, so the coupled copies start
    equal (Duong et al. 2015). Shared slots keep the module of the group's first task.

    ``pretrained``: every task's backbone starts as a copy of this model's weights (its
    architecture must be ``model_config``'s), so shared, group, private and soft-coupled
    copies all start from the pretrained layers; heads, discriminator and cross-stitch units
    are new.
    """
    if tasks is None:
        run = model_config
        if not all(hasattr(run, a) for a in ("model", "tasks", "sharing")):
            raise ValueError("build_model(config) needs an object with .model, .tasks and "
                             f".sharing, got {type(run).__name__}")
        model_config, tasks, sharing = run.model, run.tasks, run.sharing
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_dict(model_config)
    if sharing is None or isinstance(sharing, dict):
        sharing = SharingConfig.from_dict(sharing)
    specs = [_as_task(t) for t in tasks]
    plan = make_plan(sharing, model_config, specs)
    model_config.check_memory(copies=len(specs))   # before anything is allocated
    backbones = [EncoderDecoder(model_config) for _ in specs]
    if pretrained is not None:
        state = pretrained.state_dict()
        for bb in backbones:
            bb.load_state_dict(state)
    elif plan.coupled:
        state = backbones[0].state_dict()
        for bb in backbones[1:]:
            bb.load_state_dict(state)
    heads = {t.name: ClassifierHead(model_config.d_model, len(t.labels or []),
                                    sharing.classifier_hidden, sharing.classifier_pooling,
                                    model_config.dropout)
             for t in specs if t.head_kind == "classifier"}
    heads.update({t.name: RankHead(sharing.rank_normalize) for t in specs if t.head_kind == "rank"})
    discriminator = (build_discriminator(sharing, model_config.d_model, len(specs))
                     if sharing.adversarial else None)
    stitch = (CrossStitch(len(specs), model_config.n_encoder_layers, model_config.n_decoder_layers)
              if sharing.cross_stitch else None)
    transforms: list[SlotTransform] = []
    if sharing.strategy in MIXTURES:
        transforms.append(mixture_transform(sharing, model_config,
                                            dict(zip(plan.tasks, backbones)),
                                            upcycle=pretrained is not None))
    adapters = TaskAdapterOptions.from_dict(sharing.adapters) if sharing.adapters else None
    if adapters is not None:   # per-task LoRA (heads.task_adapters), after the experts
        transforms.append(adapter_transform(adapters, specs))
    apply_transforms(backbones, plan, transforms)
    model = MultiTaskModel(backbones, specs, plan, heads, discriminator, stitch)
    if adapters is not None and adapters.freeze:
        freeze_backbone(model)
    return model


def apply_transforms(backbones: list[EncoderDecoder], plan: SharingPlan,
                     transforms: list[SlotTransform]) -> None:
    """Per-slot transforms (mixtures of experts, per-task adapters): for every slot and group,
    ``transform(slot, module, group)`` returns the group's module, or None to leave it. The
    first transform receives the slot's BASE module (task 0's), so that what it builds for
    each group (typically a :func:`polytask.heads.forks.fork`) shares the base's tensors;
    each later one receives the previous result for that group. The result is installed in
    the backbone of every task of the group, where :class:`MultiTaskModel` picks it up."""
    if not transforms:
        return
    index = {name: i for i, name in enumerate(plan.tasks)}
    for slot in plan.slots:
        base = get_slot(backbones[0], slot)
        for group in plan.groups(slot):
            module: nn.Module | None = None
            for transform in transforms:
                module = transform(slot, base if module is None else module, group) or module
            if module is not None:
                for name in group:
                    set_slot(backbones[index[name]], slot, module)


@torch.no_grad()
def copies_equal(model: MultiTaskModel, slot: str) -> bool:
    """True if every group module at ``slot`` holds the same values (soft sharing at init)."""
    states = [model.module(slot, k).state_dict() for k in range(len(model.plan.groups(slot)))]
    return all(torch.equal(s[key], states[0][key]) for s in states[1:] for key in s)
