"""``SharingConfig``: the ``sharing:`` section of a run config, as a strict dataclass.

Parameter sharing is one mechanism (see :mod:`polytask.heads.plan`); this config only says which plan to
build and with which options:

* ``strategy``: ``none`` (single-task baselines: a task shares nothing), ``hard`` (the whole
  backbone shared, heads private; Caruana 1997), ``soft`` (private copies initialised equal and
  pulled together by an L2 penalty, Duong et al. 2015), ``hierarchical`` (bottom
  ``shared_layers`` of each stack shared by all tasks, the next ``group_layers`` by task group,
  the rest by one task; Ruder 2017, Vandenhende et al. 2019 "branched" networks).
* ``cross_stitch`` (``none`` / ``soft`` only): learned linear combinations of the task
  columns' activations after every layer (Misra et al. 2016, :mod:`polytask.heads.cross_stitch`).
* ``lm_head``: one LM head for all tasks (``shared``) or one per task (``per_task``).
* classifier head: pooling ``mean`` (over real tokens) or ``first`` token, then an MLP with
  ``classifier_hidden`` units (``None``: d_model).
* adversarial shared-private training (Liu, Qiu & Huang 2017): a task discriminator on the
  shared features behind a gradient-reversal layer whose coefficient ``grl_lambda`` is a fixed
  float or ``"schedule"`` (Ganin & Lempitsky 2015: ``2 / (1 + exp(-gamma * p)) - 1`` with
  training progress ``p`` in [0, 1] and ``grl_gamma`` = 10), plus the orthogonality penalty
  ``||S^T P||_F^2`` weighted by ``orthogonality_weight``.
* mixtures of experts (:mod:`polytask.heads.experts`): ``mmoe`` (Ma et al. 2018: every task
  gates over ``experts`` shared feed-forward experts) and ``ple`` (Tang et al. 2020, CGC:
  ``shared_experts`` shared plus ``task_experts`` of the task's own), optionally sparse
  (``top_k``) and with a load-balancing loss (``balance_weight``).
* ``adapters``: per-task adapters (options validated by ``heads.task_adapters``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from polytask.core.data.tasks import TaskSpec
from polytask.core.model.fields import bounds, check_fields, from_dict
from polytask.heads.task_adapters import TaskAdapterOptions

# built in; more via heads.register_plan
STRATEGIES = ("none", "hard", "soft", "hierarchical", "mmoe", "ple")


@dataclass
class SharingConfig:
    """How tasks share the backbone, and the options of the heads and the adversarial loss.

    ``shared_layers`` and ``group_layers`` are counted from the bottom of each stack (encoder
    and decoder alike) and only used by ``hierarchical``; they are checked against the layer
    counts of the model when the plan is built (:func:`polytask.heads.plan.make_plan`).
    """

    # which layers tasks share: none, hard, soft, hierarchical, mmoe, ple or a registered plan
    strategy: str = "hard"
    # hierarchical: bottom layers of each stack shared by all tasks
    shared_layers: int = field(default=1, metadata=bounds(ge=0))
    # hierarchical: next layers shared within a task group
    group_layers: int = field(default=1, metadata=bounds(ge=0))
    # soft: weight of the L2 penalty between the task copies
    soft_weight: float = field(default=1e-2, metadata=bounds(ge=0))
    cross_stitch: bool = False  # none/soft: learned mixing of the task columns after each layer
    lm_head: Literal["shared", "per_task"] = "shared"  # one LM head for all tasks or one per task
    # classifier head: mean over real tokens or the first token
    classifier_pooling: Literal["mean", "first"] = "mean"
    # classifier head: hidden units of its MLP
    classifier_hidden: int | None = field(default=None, metadata=bounds(gt=0, null="d_model"))
    # rank head: a label's score is its summed or mean token log-probability
    rank_normalize: Literal["sum", "mean"] = "sum"
    adversarial: bool = False  # add a task discriminator on the shared features (Liu et al. 2017)
    # weight of the adversarial loss in the total
    adversarial_weight: float = field(default=0.05, metadata=bounds(ge=0))
    # gradient-reversal coefficient, or 'schedule' (Ganin & Lempitsky 2015)
    grl_lambda: float | Literal["schedule"] = field(default=1.0, metadata=bounds(ge=0))
    # steepness of the grl_lambda schedule; 0 would hold the scheduled coefficient at 0: the
    # reversal would never act
    grl_gamma: float = field(default=10.0, metadata=bounds(gt=0))
    # weight of the shared-private orthogonality penalty
    orthogonality_weight: float = field(default=0.0, metadata=bounds(ge=0))
    # mmoe: shared feed-forward experts per layer, gated per task
    experts: int = field(default=2, metadata=bounds(ge=1))
    # ple: shared feed-forward experts per layer
    shared_experts: int = field(default=1, metadata=bounds(ge=0))
    # ple: each task's own feed-forward experts per layer
    task_experts: int = field(default=1, metadata=bounds(ge=1))
    # mmoe/ple: experts kept per token (largest gate values, renormalised); None: all
    top_k: int | None = field(default=None, metadata=bounds(ge=1, null="every expert (dense)"))
    # mmoe/ple: weight of the Switch load-balancing loss (Fedus et al. 2021)
    balance_weight: float = field(default=0.0, metadata=bounds(ge=0))
    # per-task adapters: options of heads.task_adapters (empty: none)
    adapters: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "sharing")   # types, and the bounds above (every float finite)
        if self.strategy not in strategy_names():
            raise ValueError(f"sharing.strategy = {self.strategy!r} is invalid: expected one of "
                             f"{', '.join(repr(n) for n in strategy_names())} (register more with "
                             "heads.register_plan)")
        # Liu et al.'s discriminator sees *shared* features; with nothing shared there are none.
        if self.adversarial and self.strategy in ("none", "soft"):
            raise ValueError(
                f"sharing.adversarial = true needs shared layers, but sharing.strategy = "
                f"{self.strategy!r} shares none; use 'hard' or 'hierarchical'")
        if self.cross_stitch and self.strategy not in ("none", "soft"):
            raise ValueError(
                f"sharing.cross_stitch = true connects private task columns; sharing.strategy "
                f"= {self.strategy!r} shares layers; use 'none' or 'soft'")
        if self.orthogonality_weight > 0 and self.strategy != "hierarchical":
            raise ValueError(
                f"sharing.orthogonality_weight = {self.orthogonality_weight} needs both shared "
                f"and private layers (strategy 'hierarchical'), got {self.strategy!r}")
        self._check_experts()
        self._check_adapters()

    def _check_adapters(self) -> None:
        """``adapters`` fork the ONE base layer of each slot per adapter group, so every layer
        slot must start shared by all tasks: ``hard``, or ``mmoe`` / ``ple`` (shared forks)."""
        if not self.adapters:
            return
        TaskAdapterOptions.from_dict(self.adapters)   # names sharing.adapters.<key>
        if self.strategy not in ("hard", "mmoe", "ple"):
            raise ValueError(f"sharing.adapters adds per-task adapters to a backbone all tasks "
                             f"share, but sharing.strategy = {self.strategy!r} gives tasks their "
                             "own layers; use 'hard', 'mmoe' or 'ple'")

    def _check_experts(self) -> None:
        """The mixture options act on ``mmoe`` / ``ple`` only; like ``shared_layers``, the
        expert counts are ignored by other strategies, but a gate option that changes the
        training (``top_k``, ``balance_weight``) is refused there."""
        if self.strategy not in ("mmoe", "ple"):
            for key, value, default in (("top_k", self.top_k, None),
                                        ("balance_weight", self.balance_weight, 0.0)):
                if value != default:
                    raise ValueError(f"sharing.{key} = {value!r} gates experts, but sharing."
                                     f"strategy = {self.strategy!r} has none; use 'mmoe' or 'ple'")
            return
        available = self.experts if self.strategy == "mmoe" else (
            self.shared_experts + self.task_experts)
        if self.top_k is not None and self.top_k > available:
            what = ("sharing.experts" if self.strategy == "mmoe" else
                    "sharing.shared_experts + sharing.task_experts")
            raise ValueError(f"sharing.top_k = {self.top_k} exceeds the {available} experts a "
                             f"task may use ({what}); choose top_k in [1, {available}] or null")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "SharingConfig":
        return from_dict(cls, data, "sharing")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the registry of strategies (the plans themselves: polytask.heads.plan) ---------------
PlanFunction = Callable[[list[TaskSpec], list[str], "SharingConfig"], dict[str, Sequence[Sequence[str]]]]
CUSTOM_PLANS: dict[str, tuple[PlanFunction, bool]] = {}


def register_plan(name: str, *, coupled: bool = False) -> Callable[[PlanFunction], PlanFunction]:
    """Register a sharing strategy from an experiment script, without touching the library::

        @heads.register_plan("shared_encoder")
        def shared_encoder(tasks, slots, sharing):
            everyone, each = [[t.name for t in tasks]], [[t.name] for t in tasks]
            return {s: each if s.startswith("decoder") else everyone for s in slots}

    The function receives the task specs, the slot names (:func:`slot_names`) and the sharing
    config, and returns, for every slot, a partition of the task names into groups; each group
    gets one module. ``coupled=True`` adds the soft-sharing L2 penalty between copies. Then
    ``sharing: {strategy: shared_encoder}`` selects it.
    """
    if name in STRATEGIES or name in CUSTOM_PLANS:
        raise ValueError(f"sharing strategy {name!r} is already registered")

    def decorate(fn: PlanFunction) -> PlanFunction:
        CUSTOM_PLANS[name] = (fn, coupled)
        return fn
    return decorate


def strategy_names() -> list[str]:
    return list(STRATEGIES) + list(CUSTOM_PLANS)
