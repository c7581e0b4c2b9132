"""``TaskSpec``: what polytask knows about one task, shared by data, heads, losses and metrics.

A task is declared in a run config (YAML) or by the built-in suite. Every task is text-to-text
at the data level (classification targets are label words); ``head`` says how the model
predicts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from polytask.core.model.fields import bounds, check_fields, from_dict

Kind = Literal["generation", "classification"]
Head = Literal["auto", "lm", "classifier", "rank"]


SPLITS = ("train", "validation", "test")
"""The split names a task file may be given under (``files: {train: ..., ...}``)."""


@dataclass
class TaskSpec:
    """One task.

    Fields:
        name: unique task name (also the key of its losses, metrics and private parameters).
        kind: ``generation`` (target text) or ``classification`` (one of ``labels``).
        labels: the label words of a classification task, in class-index order.
        head: ``lm`` decodes the target text; ``classifier`` is an MLP over pooled encoder
            states; ``rank`` scores each label's verbalisation with the decoder and picks the
            most likely (T0, Sanh et al. 2022). ``auto``: ``lm`` for generation, ``classifier``
            for classification.
        loss: a name registered in :mod:`losses`; ``None``: ``ce`` for a classifier head,
            ``generative`` otherwise.
        weight: static task weight in the total loss.
        group: task group for hierarchical sharing; ``None``: the task's kind.
        metric: the metric reported for the task; ``None``: ``accuracy`` for classification,
            ``exact_match`` for generation.
        files: split name -> data file (JSONL, CSV or TSV).
        templates: instruction templates (FLAN-style); ``{input}`` is optional.
        held_out: kept out of training and evaluated zero-shot (FLAN's protocol).
        max_examples: per-task cap on training examples (as T5's mixtures do).
    """

    name: str
    kind: Kind = "generation"
    labels: list[str] | None = None
    head: Head = "auto"
    loss: str | None = None
    weight: float = field(default=1.0, metadata=bounds(ge=0))
    group: str | None = None
    metric: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    templates: list[str] = field(default_factory=list)
    held_out: bool = False
    max_examples: int | None = field(default=None, metadata=bounds(gt=0, null="no cap"))

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        check_fields(self, f"tasks[{self.name}]")   # types, weight finite >= 0, max_examples
        unknown = [k for k in self.files if k not in SPLITS]
        if unknown:   # refused when the config is read, not when its data loads
            raise ValueError(f"tasks[{self.name}].files.{unknown[0]}: unknown split "
                             f"{unknown[0]!r}; splits: {', '.join(SPLITS)}")
        if self.kind == "classification" and not self.labels:
            raise ValueError(f"task {self.name!r} is a classification task but declares no labels")
        if self.kind == "generation" and self.head in ("classifier", "rank"):
            raise ValueError(f"task {self.name!r}: head {self.head!r} needs kind 'classification'")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {self.name!r} has duplicate labels: {self.labels}")

    @property
    def head_kind(self) -> str:
        if self.head != "auto":
            return self.head
        return "lm" if self.kind == "generation" else "classifier"

    @property
    def loss_name(self) -> str:
        if self.loss is not None:
            return self.loss
        return "ce" if self.head_kind == "classifier" else "generative"

    @property
    def group_name(self) -> str:
        return self.group if self.group is not None else self.kind

    @property
    def metric_name(self) -> str:
        if self.metric is not None:
            return self.metric
        return "accuracy" if self.kind == "classification" else "exact_match"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        if not isinstance(data, dict) or "name" not in data:
            raise ValueError(f"a task spec needs at least a 'name', got {data!r}")
        return from_dict(cls, data, f"tasks[{data['name']}]")
