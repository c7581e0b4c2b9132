"""Per-task (or per-group) LoRA adapters on one shared backbone, and skill routing.

Parameter-efficient hard sharing: every task runs the same backbone tensors, and each task
(``per: task``) or task group (``per: group``, :attr:`TaskSpec.group_name`) adds its own LoRA
(Hu et al. 2021) on the targeted linear layers of every encoder and decoder layer. With
``skills: n > 0`` the adapters are Polytropon's skill inventory instead (Ponti et al. 2023,
:mod:`polytask.heads.skills`): ``n`` LoRA pairs per adapted linear, shared by all groups,
combined by each group's learned allocation.

How it is built (the same mechanism as every sharing plan, :mod:`polytask.heads.plan`):

1. the plan's layer slots are partitioned by adapter group (:func:`adapter_slots` refines the
   strategy's partition with :func:`adapter_groups`);
2. for every layer slot and group, :func:`adapter_transform` returns a
   :func:`polytask.heads.forks.fork` of the slot's base layer — every tensor shared — whose
   targeted ``nn.Linear`` layers are wrapped with the group's adapter;
3. with ``freeze``, :func:`freeze_backbone` leaves only adapters, skills, allocations and the
   task heads trainable.

The wrapper is :class:`TaskLoRALinear`, not :class:`polytask.core.peft.LoRALinear`: LoRA's
``merge`` folds the update into the base weight, which here is shared by every group, so a
per-task update must never be merged (``unwrap_lora`` leaves these wrappers alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Literal

import torch
from torch import nn

from polytask.core.data.tasks import TaskSpec
from polytask.core.model.fields import bounds, check_fields, from_dict
from polytask.core.peft.modules import backbone_parameters
from polytask.heads.forks import fork
from polytask.heads.skills import Allocation, LowRankLinear, SkillBank, SkillLoRALinear

Group = frozenset[str]
WHERE = "sharing.adapters"


@dataclass
class TaskAdapterOptions:
    """The ``sharing.adapters`` section: per-task LoRA or skill routing on a shared backbone."""

    method: Literal["lora"] = "lora"  # the adapter kind (LoRA, Hu et al. 2021)
    per: Literal["task", "group"] = "task"  # one adapter per task, or per TaskSpec.group_name
    r: int = field(default=8, metadata=bounds(gt=0))  # rank of each update
    # the update is scaled by alpha / r; 0 would scale every update to nothing
    alpha: float = field(default=16.0, metadata=bounds(gt=0))
    dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))  # on the update's input
    # linear layers to adapt: module names (q_proj) or wildcard patterns on
    # "<slot>.<path>" (decoder.*.cross_attn.q_proj)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    freeze: bool = True  # freeze the shared backbone: only adapters and task heads train
    # > 0: skill routing (Polytropon) over this many shared LoRA skills per adapted linear
    skills: int = field(default=0, metadata=bounds(ge=0))
    # skills: learned task x skill allocation, or fixed one-hot (group k -> skill k)
    allocation: Literal["learned", "identity"] = "learned"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        check_fields(self, WHERE)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"{WHERE}.targets = {self.targets!r} is invalid: expected module "
                             "names or patterns, e.g. [q_proj, v_proj]")
        if self.allocation == "identity" and self.skills == 0:
            raise ValueError(f"{WHERE}.allocation = 'identity' routes over skills, but "
                             f"{WHERE}.skills = 0; set skills >= the number of adapter groups")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TaskAdapterOptions":
        return from_dict(cls, data, WHERE)


# --- the partition ----------------------------------------------------------------------
def adapter_groups(tasks: list[TaskSpec], options: TaskAdapterOptions) -> list[list[str]]:
    """The adapter groups, in task order: ``[[a], [b], ...]`` per task, or the tasks of each
    :attr:`TaskSpec.group_name` (groups ordered by their first task) per group."""
    if options.per == "task":
        return [[t.name] for t in tasks]
    by_group: dict[str, list[str]] = {}
    for t in tasks:
        by_group.setdefault(t.group_name, []).append(t.name)
    return list(by_group.values())


def is_layer_slot(slot: str) -> bool:
    stack, _, what = slot.partition(".")
    return stack in ("encoder", "decoder") and what.isdigit()


def adapter_slots(slots: dict[str, tuple[Group, ...]], partition: list[list[str]]
                  ) -> dict[str, tuple[Group, ...]]:
    """A plan's slots with every layer slot's groups split by adapter group (the common
    refinement: each group of the strategy intersected with each adapter group); embedding,
    norms and LM head are left as the strategy made them."""
    out = {}
    for slot, groups in slots.items():
        if is_layer_slot(slot):
            groups = tuple(frozenset(g) & frozenset(a) for g in groups for a in partition
                           if frozenset(g) & frozenset(a))
        out[slot] = groups
    return out


# --- per-task LoRA ------------------------------------------------------------------------
class LoRAPair(nn.Module):
    """One adapter's ``A (r, in)`` (Kaiming-uniform, as loralib) and ``B (out, r)`` (zero)."""

    def __init__(self, in_features: int, out_features: int, r: int, *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.r = r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class TaskLoRALinear(LowRankLinear):
    """``base(x) + (alpha / r) * (dropout(x) A^T) B^T`` with one group's :class:`LoRAPair`.

    ``base`` is the shared linear (its tensors are every group's); shapes ``(..., in)`` ->
    ``(..., out)``. Never merged: the base weight belongs to every group."""

    def __init__(self, base: nn.Linear, lora: LoRAPair, alpha: float = 16.0,
                 dropout: float = 0.0) -> None:
        super().__init__(base, lora.r, alpha, dropout)
        self.lora = lora

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora.lora_A, self.lora.lora_B

    def extra_repr(self) -> str:
        return f"r={self.lora.r}, scaling={self.scaling}"


# --- the slot transform ---------------------------------------------------------------
def _matches(slot: str, path: str, patterns: list[str]) -> bool:
    leaf, full = path.rsplit(".", 1)[-1], f"{slot}.{path}"
    return any(leaf == p or fnmatchcase(full, p) for p in patterns)


def _targets(slot: str, layer: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Linear]]:
    """The targeted ``nn.Linear`` layers of ``layer`` (paths relative to it). A plain module
    name that names no linear layer of the slot is a typo: it raises, listing the names."""
    linears = [(n, m) for n, m in layer.named_modules() if type(m) is nn.Linear]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    for p in patterns:
        plain = not any(c in p for c in "*?[.")
        if plain and p not in leaves:
            raise ValueError(f"{WHERE}.targets: {p!r} names no linear layer of slot {slot!r}; "
                             f"linear layer names: {', '.join(leaves)} (or a wildcard pattern)")
    return [(n, m) for n, m in linears if _matches(slot, n, patterns)]


SlotTransform = Callable[[str, nn.Module, Group], "nn.Module | None"]


def adapter_transform(options: TaskAdapterOptions, tasks: list[TaskSpec]) -> SlotTransform:
    """``transform(slot, base_layer, group)`` -> the group's fork of ``base_layer`` with its
    adapters on the targeted linears (None for a slot that is not an encoder / decoder layer).

    ``group`` must lie inside one adapter group; plan groups finer than the adapter groups
    (e.g. per-task ``mmoe`` forks with ``per: group``) get forks holding the SAME adapter
    objects. With skills, each slot's banks (one per targeted linear) are created once and
    shared by every group's fork; each adapter group has its own :class:`Allocation` row.
    """
    partition = adapter_groups(tasks, options)
    owner = {name: k for k, names in enumerate(partition) for name in names}
    if options.skills and options.allocation == "identity" and options.skills < len(partition):
        raise ValueError(f"{WHERE}.skills = {options.skills} with allocation 'identity' needs "
                         f"one skill per adapter group ({len(partition)}: {partition})")
    pairs: dict[tuple[str, int, str], LoRAPair] = {}
    banks: dict[tuple[str, str], SkillBank] = {}
    rows: dict[tuple[str, int], Allocation] = {}

    def wrap(slot: str, k: int, path: str, linear: nn.Linear) -> nn.Module:
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        if not options.skills:
            key = (slot, k, path)
            if key not in pairs:
                pairs[key] = LoRAPair(linear.in_features, linear.out_features, options.r,
                                      **factory)
            return TaskLoRALinear(linear, pairs[key], options.alpha, options.dropout)
        if (slot, path) not in banks:
            banks[slot, path] = SkillBank(options.skills, linear.in_features,
                                          linear.out_features, options.r, **factory)
        if (slot, k) not in rows:
            rows[slot, k] = Allocation(options.skills, options.allocation, k).to(**factory)
        return SkillLoRALinear(linear, banks[slot, path], rows[slot, k], options.alpha,
                               options.dropout)

    def transform(slot: str, base: nn.Module, group: Group) -> nn.Module | None:
        if not is_layer_slot(slot):
            return None
        ks = {owner[name] for name in group}
        if len(ks) != 1:
            raise ValueError(f"{WHERE}: plan group {sorted(group)} at slot {slot!r} spans "
                             f"adapter groups {[partition[k] for k in sorted(ks)]}; the plan "
                             "must split layer slots by adapter group (adapter_slots)")
        (k,) = ks
        layer = fork(base)
        for path, linear in _targets(slot, layer, options.targets):
            parent, _, leaf = path.rpartition(".")
            holder = layer.get_submodule(parent) if parent else layer
            setattr(holder, leaf, wrap(slot, k, path, linear))
        return layer

    return transform


# --- training: what is frozen, what the adapters learned ---------------------------
def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter, skill and allocation parameter of ``model``, each once."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, TaskLoRALinear):
            parts = [m.lora]
        elif isinstance(m, SkillLoRALinear):
            parts = [m.bank, m.allocation]
        else:
            continue
        for part in parts:
            for p in part.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def freeze_backbone(model: nn.Module) -> None:
    """``requires_grad = False`` on every backbone parameter (the task views of a multi-task
    model, :mod:`polytask.core.peft.modules`) except adapters, skills and allocations; what
    lies outside the backbone (classifier / rank heads, discriminator) keeps its setting.
    Call it when ``options.freeze``; a model without adapters is refused (it would freeze
    everything)."""
    keep = {id(p) for p in adapter_parameters(model)}
    if not keep:
        raise ValueError(f"freeze_backbone: the model has no {WHERE} adapters to train")
    inside = backbone_parameters(model)
    for p in model.parameters():
        if id(p) in inside and id(p) not in keep:
            p.requires_grad_(False)


@torch.no_grad()
def allocation_table(model: Any, slot: str) -> torch.Tensor:
    """Task x skill weights ``(tasks, skills)`` at layer ``slot`` of a multi-task model with
    skill routing (rows in task order; a task that never runs the slot, a classifier task's
    decoder, gets a row of NaN)."""
    found = []
    for spec in model.tasks:
        if not model.uses(spec.name, slot):
            found.append(None)
            continue
        layer = model.module(slot, model.plan.group_index(slot, spec.name))
        rows = [m.allocation for m in layer.modules() if isinstance(m, SkillLoRALinear)]
        if not rows:
            raise ValueError(f"slot {slot!r} of task {spec.name!r} has no skill-routed linear "
                             f"layer ({WHERE}.skills = 0, or no target in this slot)")
        found.append(rows[0].weights().detach().float().cpu())
    width = next((len(f) for f in found if f is not None), None)
    if width is None:
        raise ValueError(f"no task runs slot {slot!r} (classifier tasks run no decoder)")
    return torch.stack([torch.full((width,), float("nan")) if f is None else f for f in found])
