"""Adversarial shared-private multi-task learning (Liu, Qiu & Huang 2017, "Adversarial
Multi-task Learning for Text Classification", ACL), on top of a sharing plan.

* The task discriminator (``losses.TaskDiscriminator``, built by
  :func:`polytask.heads.build.build_discriminator`) sees the mean-pooled *shared* features — the encoder
  states after the last slot shared by all tasks — behind a gradient-reversal layer (Ganin &
  Lempitsky 2015). Its cross-entropy (eq. 13) trains the discriminator to tell the tasks apart
  and, reversed, trains the shared layers to make them indistinguishable: a working setup
  pushes its accuracy toward chance (1 / k).
* The orthogonality penalty (eq. 14), ``sum_k ||S_k^T P_k||_F^2``, where the rows of S_k and
  P_k are the pooled shared and private features of task k's rows in the batch. Liu et al. run
  the shared and private encoders side by side; in a hierarchical plan the private layers sit
  on top of the shared ones, so P_k is the pooled encoder output of task k.
"""
from __future__ import annotations

import torch

from polytask.heads.classifier import pool
from polytask.heads.model import MultiTaskOutput
from polytask.losses.adversarial import AdversarialLoss
from polytask.losses.penalties import orthogonality_penalty

_adversarial_ce = AdversarialLoss()


def adversarial_loss(output: MultiTaskOutput) -> tuple[torch.Tensor, float]:
    """Discriminator cross-entropy over every row of the batch and its accuracy (for the logs).

    Raises ``ValueError`` if the model has no discriminator (``sharing.adversarial = false``).
    """
    if output.task_logits is None:
        raise ValueError("no discriminator output: build the model with sharing.adversarial = true")
    loss = _adversarial_ce(output.task_logits, output.task_ids)
    accuracy = (output.task_logits.argmax(-1) == output.task_ids).float().mean().item()
    return loss, accuracy


def orthogonality_loss(output: MultiTaskOutput) -> torch.Tensor:
    """``sum_k ||S_k^T P_k||_F^2`` over the tasks present in the batch (Liu et al. eq. 14)."""
    if output.shared is None or output.private is None:
        raise ValueError("the orthogonality penalty needs shared and private encoder layers "
                         "(sharing.strategy = 'hierarchical')")
    shared = pool(output.shared, output.src_mask, "mean")      # (b, d)
    private = pool(output.private, output.src_mask, "mean")    # (b, d)
    total = shared.new_zeros(())
    for k in torch.unique(output.task_ids).tolist():
        rows = (output.task_ids == k).nonzero(as_tuple=True)[0]
        total = total + orthogonality_penalty(shared[rows], private[rows])
    return total
