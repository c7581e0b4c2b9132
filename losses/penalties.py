"""Regularisers that couple tasks: shared/private orthogonality and soft parameter sharing.

* ``orthogonality`` — Liu, Qiu & Huang (2017), Sec. 4.2 (L_diff):
  L_diff = sum_k || S^k^T H^k ||_F^2, where the rows of S^k and H^k are the shared and the
  private (task k) features of the same inputs. It pushes the private space to hold what the
  shared one does not.
* ``soft_sharing`` — Duong et al. (2015), "Low Resource Dependency Parsing: Cross-lingual
  Parameter Sharing in a Neural Network Parser", ACL: each task keeps its own copy of a layer
  and an L2 penalty sum_{a<b} ||theta_a - theta_b||^2 over every pair of coupled copies pulls
  the copies together (its strength is a config value).

Both take tensors (features, or lists of parameters), never model classes.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch
from torch import Tensor, nn

from polytask.losses.registry import register


def orthogonality_penalty(shared: Tensor, private: Tensor) -> Tensor:
    """||S^T P||_F^2 for S ``(..., n, d_s)`` and P ``(..., n, d_p)`` over the same n rows.

    Leading axes are batched and summed (one term per task, as in L_diff). Returns ``()``.
    """
    if shared.ndim < 2 or shared.shape[:-1] != private.shape[:-1]:
        raise ValueError(f"shared {tuple(shared.shape)} and private {tuple(private.shape)} must "
                         "be (..., n, d) with the same leading axes and rows")
    cross = shared.transpose(-1, -2) @ private            # (..., d_s, d_p)
    return cross.pow(2).sum()


def soft_sharing_penalty(copies: Sequence[Sequence[Tensor]]) -> Tensor:
    """sum over pairs a < b of coupled copies of sum_j ||theta_a[j] - theta_b[j]||^2.

    Args:
        copies: one entry per task copy, each a list of parameters in the same order and
            shapes (e.g. ``list(layer_of_task_a.parameters())``).
    Returns ``()``; 0 for identical copies, growing quadratically as they diverge.
    """
    copies = [list(c) for c in copies]
    if len(copies) < 2:
        raise ValueError(f"soft sharing needs >= 2 copies, got {len(copies)}")
    n = len(copies[0])
    for i, c in enumerate(copies):
        if len(c) != n or any(p.shape != q.shape for p, q in zip(c, copies[0])):
            raise ValueError(f"copy {i} has parameter shapes {[tuple(p.shape) for p in c]}, "
                             f"copy 0 has {[tuple(p.shape) for p in copies[0]]}")
    total = torch.zeros((), dtype=copies[0][0].dtype, device=copies[0][0].device)
    for a, b in combinations(copies, 2):
        for pa, pb in zip(a, b):
            total = total + (pa - pb).pow(2).sum()
    return total


@register("orthogonality")
class OrthogonalityPenalty(nn.Module):
    """Module form of :func:`orthogonality_penalty`: ``forward(shared, private) -> ()``."""

    def forward(self, shared: Tensor, private: Tensor) -> Tensor:
        return orthogonality_penalty(shared, private)


@register("soft_sharing")
class SoftSharingPenalty(nn.Module):
    """Module form of :func:`soft_sharing_penalty`: ``forward(copies) -> ()``."""

    def forward(self, copies: Sequence[Sequence[Tensor]]) -> Tensor:
        return soft_sharing_penalty(copies)
