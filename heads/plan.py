"""``SharingPlan``: for every slot of the backbone, which tasks share it.

A slot is one module position of the encoder-decoder: ``embedding``, ``encoder.0`` ...
``encoder.{n-1}``, ``encoder.norm``, ``decoder.0`` ... ``decoder.norm``, ``lm_head``. For each
slot the plan holds a partition of the task names into groups; every group gets ONE module
object and rows of a mixed batch are routed to the module of their group
(:mod:`polytask.heads.routing`). The strategies differ only in the partitions:

=============  ==============================================================================
none           every slot private: ``{a}, {b}, ...`` (single-task baselines, embeddings too)
hard           every slot shared: ``{a, b, ...}``; only the task heads are private
               (Caruana 1997; Ruder 2017 "An Overview of Multi-Task Learning", section 3)
soft           private like ``none``, copies initialised equal and coupled by an L2 penalty
               (Duong et al. 2015, "Low Resource Dependency Parsing: Cross-lingual Parameter
               Sharing in a Neural Network Parser")
hierarchical   per stack: bottom ``shared_layers`` shared by all, next ``group_layers`` by
               task group (``TaskSpec.group_name``), the rest private (Ruder 2017; branched
               multi-task networks, Vandenhende et al. 2019)
mmoe, ple      every layer slot per task ``{a}, {b}, ...`` and everything else shared as in
               ``hard``: each task's layer is a *fork* of one shared layer whose feed-forward
               sublayer is the task's gated mixture of experts (:mod:`polytask.heads.experts`;
               Ma et al. 2018 MMoE; Tang et al. 2020 PLE/CGC)
=============  ==============================================================================

A stack's final norm sits on top of its last layer, so it takes that layer's partition (except
under ``mmoe`` / ``ple``, whose per-task layers share every tensor but the gates and task
experts: their final norms are shared). The LM head is shared or per task (``SharingConfig.lm_head``); with tied embeddings it must be
grouped exactly like the embedding, because it *is* the embedding matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

from polytask.core.model.config import ModelConfig
from polytask.core.data.tasks import TaskSpec
from polytask.heads.config import CUSTOM_PLANS, SharingConfig
from polytask.heads.task_adapters import TaskAdapterOptions, adapter_groups, adapter_slots

Group = frozenset[str]


@dataclass(frozen=True)
class SharingPlan:
    """Slot name -> ordered partition of ``tasks`` into groups (each group: one module)."""

    strategy: str
    tasks: tuple[str, ...]
    slots: dict[str, tuple[Group, ...]]
    coupled: bool = False  # soft sharing: private copies tied by an L2 penalty

    def __post_init__(self) -> None:
        everyone = set(self.tasks)
        for slot, groups in self.slots.items():
            seen: list[str] = [t for g in groups for t in g]
            if sorted(seen) != sorted(everyone) or any(not g for g in groups):
                raise ValueError(
                    f"sharing plan slot {slot!r}: groups {[sorted(g) for g in groups]} are not a "
                    f"partition of the tasks {sorted(everyone)}")

    def groups(self, slot: str) -> tuple[Group, ...]:
        if slot not in self.slots:
            raise ValueError(f"unknown plan slot {slot!r}; slots: {', '.join(self.slots)}")
        return self.slots[slot]

    def group_index(self, slot: str, task: str) -> int:
        """Index of the group (= module) of ``task`` at ``slot``."""
        for k, group in enumerate(self.groups(slot)):
            if task in group:
                return k
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")

    def shared_by_all(self, slot: str) -> bool:
        return len(self.groups(slot)) == 1 and len(self.tasks) > 1

    def describe(self) -> str:
        """One line per slot, e.g. ``encoder.1: {a, b} | {c}`` — for logs and tutorials."""
        lines = []
        for slot, groups in self.slots.items():
            parts = " | ".join("{" + ", ".join(t for t in self.tasks if t in g) + "}"
                               for g in groups)
            lines.append(f"{slot}: {parts}")
        return "\n".join(lines)


def slot_names(config: ModelConfig) -> list[str]:
    """The slots of an encoder-decoder with ``config``'s layer counts, bottom to top."""
    return (["embedding"] + [f"encoder.{i}" for i in range(config.n_encoder_layers)]
            + ["encoder.norm"] + [f"decoder.{i}" for i in range(config.n_decoder_layers)]
            + ["decoder.norm", "lm_head"])


def _custom_plan(sharing: SharingConfig, config: ModelConfig, tasks: list[TaskSpec],
                 names: tuple[str, ...]) -> SharingPlan:
    fn, coupled = CUSTOM_PLANS[sharing.strategy]
    slots = slot_names(config)
    raw = fn(list(tasks), slots, sharing)
    if set(raw) != set(slots):
        raise ValueError(f"sharing plan {sharing.strategy!r} must give groups for exactly the "
                         f"slots {slots}; missing {sorted(set(slots) - set(raw))}, unknown "
                         f"{sorted(set(raw) - set(slots))}")
    plan = SharingPlan(sharing.strategy, names,
                       {s: tuple(frozenset(g) for g in raw[s]) for s in slots}, coupled=coupled)
    _check_tied_head(plan, sharing, config)
    return plan


def _check_tied_head(plan: SharingPlan, sharing: SharingConfig, config: ModelConfig) -> None:
    if config.tie_embeddings and plan.slots["lm_head"] != plan.slots["embedding"]:
        raise ValueError(
            f"sharing.lm_head = {sharing.lm_head!r} with model.tie_embeddings = true: a tied LM "
            f"head is the embedding matrix, which strategy {sharing.strategy!r} shares; set "
            "model.tie_embeddings = false or sharing.lm_head = 'shared'")


def make_plan(sharing: SharingConfig, config: ModelConfig, tasks: list[TaskSpec]) -> SharingPlan:
    """Build the plan of ``sharing.strategy`` for ``tasks`` on a backbone shaped by ``config``."""
    names = tuple(t.name for t in tasks)
    if not names:
        raise ValueError("a sharing plan needs at least one task, got none")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {list(names)}")
    if sharing.strategy in CUSTOM_PLANS:
        return _custom_plan(sharing, config, tasks, names)
    everyone: tuple[Group, ...] = (frozenset(names),)
    each: tuple[Group, ...] = tuple(frozenset([n]) for n in names)
    by_group: dict[str, set[str]] = {}
    for t in tasks:
        by_group.setdefault(t.group_name, set()).add(t.name)
    grouped: tuple[Group, ...] = tuple(frozenset(g) for g in by_group.values())

    if sharing.strategy == "hierarchical":
        depth = sharing.shared_layers + sharing.group_layers
        for stack, n in (("encoder", config.n_encoder_layers), ("decoder", config.n_decoder_layers)):
            if depth > n:
                raise ValueError(
                    f"sharing.shared_layers ({sharing.shared_layers}) + sharing.group_layers "
                    f"({sharing.group_layers}) = {depth} exceeds model.n_{stack}_layers ({n})")

    mixture = sharing.strategy in ("mmoe", "ple")   # per-task forks of shared layers

    def layer(i: int) -> tuple[Group, ...]:
        if mixture:
            return each
        if sharing.strategy == "hard":
            return everyone
        if sharing.strategy in ("none", "soft"):
            return each
        if i < sharing.shared_layers:
            return everyone
        if i < sharing.shared_layers + sharing.group_layers:
            return grouped
        return each

    slots: dict[str, tuple[Group, ...]] = {}
    slots["embedding"] = each if sharing.strategy in ("none", "soft") else everyone
    for stack, n in (("encoder", config.n_encoder_layers), ("decoder", config.n_decoder_layers)):
        for i in range(n):
            slots[f"{stack}.{i}"] = layer(i)
        slots[f"{stack}.norm"] = (layer(n - 1) if n and not mixture else slots["embedding"])
    if sharing.strategy in ("none", "soft"):
        slots["lm_head"] = each  # a single-task baseline shares nothing, its LM head included
    else:
        slots["lm_head"] = everyone if sharing.lm_head == "shared" else each
    if sharing.adapters:   # a fork per adapter group at every layer slot
        options = TaskAdapterOptions.from_dict(sharing.adapters)
        slots = adapter_slots(slots, adapter_groups(list(tasks), options))
    plan = SharingPlan(sharing.strategy, names, slots, coupled=sharing.strategy == "soft")
    _check_tied_head(plan, sharing, config)
    return plan
