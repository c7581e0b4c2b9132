"""From model outputs and a batch to per-task losses, extra terms and logs.

The training loop then calls ``weighting.backward(result.task_losses,
model.shared_parameters(), extra=result.extra_total(),
last_shared=model.last_shared_parameters())``: the task losses are what a weighting method
balances; the extra terms (already multiplied by their config weights) are added unweighted.

* A task's loss comes from ``losses.get(spec.loss_name)``: classifier rows use
  ``batch.class_ids``, lm and rank rows use ``batch.labels`` (a rank head is trained as
  generation of the label's verbalisation, T0).
* Partial labels: targets equal to ``IGNORE_INDEX`` give no loss and no gradient; a task none of
  whose rows in the batch is labelled is left out of ``task_losses``.
* Extra terms: ``soft`` = soft_weight * coupling penalty (Duong et al. 2015), ``adversarial`` =
  adversarial_weight * discriminator CE, ``orthogonality`` = orthogonality_weight * ||S^T P||^2
  (Liu, Qiu & Huang 2017), ``balance`` = balance_weight * the Switch load-balancing loss of
  the expert gates (``mmoe`` / ``ple``, :func:`polytask.heads.experts.balance_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polytask import losses
from polytask.core.data.batch import IGNORE_INDEX, Batch
from polytask.core.data.tasks import TaskSpec
from polytask.heads.adversarial import adversarial_loss, orthogonality_loss
from polytask.heads.config import SharingConfig
from polytask.heads.experts import MIXTURES, balance_loss
from polytask.heads.model import MultiTaskModel, MultiTaskOutput


@dataclass
class ObjectiveResult:
    """``task_losses``: task name -> () loss; ``extra``: term name -> () weighted term;
    ``logs``: plain floats (unweighted penalties, discriminator accuracy, GRL lambda)."""

    task_losses: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)

    def extra_total(self) -> torch.Tensor | None:
        """The sum of the extra terms (``weighting.backward(..., extra=...)``), None if none."""
        return torch.stack(list(self.extra.values())).sum() if self.extra else None

    def total(self, weights: dict[str, float] | None = None) -> torch.Tensor:
        """sum_k w_k L_k + sum of extras (static weights; 1 for a task not in ``weights``)."""
        weights = weights or {}
        terms = [weights.get(k, 1.0) * v for k, v in self.task_losses.items()]
        terms += list(self.extra.values())
        if not terms:
            raise ValueError("nothing to optimise: no labelled row and no extra term")
        return torch.stack(terms).sum()


class MultiTaskObjective(nn.Module):
    """Args:
        tasks: the run's task specs (same order as the model's).
        sharing: the weights of the extra terms.
        loss_options: task name -> keyword options of its loss (e.g. ``label_smoothing``).
    ``forward(model, output, batch) -> ObjectiveResult``.
    """

    def __init__(self, tasks: list[TaskSpec], sharing: SharingConfig,
                 loss_options: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        loss_options = loss_options or {}
        unknown = set(loss_options) - {t.name for t in tasks}
        if unknown:
            raise ValueError(f"loss options for unknown tasks {sorted(unknown)}; tasks: "
                             f"{', '.join(t.name for t in tasks)}")
        self.tasks, self.sharing = list(tasks), sharing
        self.criteria = nn.ModuleDict({
            str(i): losses.LOSSES.build(t.loss_name, options=loss_options.get(t.name),
                                        where=f"losses.{t.name}")
            for i, t in enumerate(tasks)})

    def forward(self, model: MultiTaskModel, output: MultiTaskOutput, batch: Batch) -> ObjectiveResult:
        task_losses: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        for i, spec in enumerate(self.tasks):
            out = output.tasks.get(spec.name)
            if out is None:
                continue
            target = batch.class_ids[out.rows] if out.head == "classifier" else batch.labels[out.rows]
            if not bool((target != IGNORE_INDEX).any()):
                continue  # no labelled row of this task: it contributes nothing
            criterion = self.criteria[str(i)]
            if out.hidden is not None and hasattr(criterion, "from_hidden"):
                # lm / rank rows: the loss may skip materialising the (n, t, V) logits
                task_losses[spec.name] = criterion.from_hidden(out.hidden, out.lm, target)
            else:
                task_losses[spec.name] = criterion(out.logits, target)
            logs[f"loss/{spec.name}"] = float(task_losses[spec.name].detach())
        extra: dict[str, torch.Tensor] = {}
        s = self.sharing
        if model.plan.coupled and s.soft_weight > 0:
            penalty = model.coupling_penalty()
            extra["soft"] = s.soft_weight * penalty
            logs["soft_penalty"] = float(penalty.detach())
        if output.task_logits is not None:
            adv, accuracy = adversarial_loss(output)
            extra["adversarial"] = s.adversarial_weight * adv
            logs["adversarial_loss"] = float(adv.detach())
            logs["discriminator_accuracy"] = accuracy
            logs["grl_lambda"] = float(model.discriminator.grl.lambda_)
        if s.orthogonality_weight > 0 and output.private is not None and output.shared is not None:
            ortho = orthogonality_loss(output)
            extra["orthogonality"] = s.orthogonality_weight * ortho
            logs["orthogonality"] = float(ortho.detach())
        if s.balance_weight > 0 and s.strategy in MIXTURES:
            balance = balance_loss(model, batch)
            extra["balance"] = s.balance_weight * balance
            logs["balance_loss"] = float(balance.detach())
        return ObjectiveResult(task_losses, extra, logs)
