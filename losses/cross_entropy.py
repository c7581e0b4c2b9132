"""Classification cross-entropy (``ce``), written out by hand.

Label smoothing convention (Szegedy et al. 2016, "Rethinking the Inception Architecture",
Sec. 7; the one ``F.cross_entropy(label_smoothing=eps)`` uses): the target distribution is

    q_c = (1 - eps) * [c == y] + eps / C          for every class c (the true one included),

so the true class receives ``1 - eps + eps / C``. fairseq's ``label_smoothed_nll_loss`` instead
spreads ``eps`` over the C - 1 *other* classes (true class gets exactly ``1 - eps``); the two
agree only after rescaling eps by C / (C - 1). We follow PyTorch so our numbers can be checked
against it.

With class weights w (as PyTorch defines them) the per-example loss is

    l_n = (1 - eps) * w[y_n] * (-log p[n, y_n])  +  (eps / C) * sum_c w[c] * (-log p[n, c])

and the mean reduction divides the sum over non-ignored examples by sum_n w[y_n].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from polytask.core.data.batch import IGNORE_INDEX
from polytask.losses.registry import register


def smoothed_nll(logits: Tensor, target: Tensor, *, weight: Tensor | None = None,
                 smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Per-element label-smoothed, class-weighted negative log-likelihood.

    Args:
        logits: ``(..., C)`` unnormalised scores.
        target: ``(...)`` long class indices; ``ignore_index`` marks elements without a label.
        weight: optional ``(C,)`` class weights.
        smoothing: eps in [0, 1), PyTorch's convention (see module docstring).
    Returns:
        ``(loss, norm)``, both ``(...)``: the loss of each element (0 where ignored) and its
        share of the mean's denominator (``w[y]``, or 1, and 0 where ignored).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                         "must agree on every axis but the last")
    n_classes = logits.shape[-1]
    keep = target != ignore_index
    safe_target = torch.where(keep, target, torch.zeros_like(target))  # gather needs a valid index
    if bool(((safe_target < 0) | (safe_target >= n_classes)).any()):
        bad = target[keep & ((target < 0) | (target >= n_classes))]
        raise ValueError(f"target values {bad.unique().tolist()} are outside [0, {n_classes}) "
                         f"and are not ignore_index ({ignore_index})")
    # half precision log-softmax loses the small probabilities smoothing needs; fp64 stays fp64
    work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = work.log_softmax(dim=-1)                                     # (..., C)
    nll_true = -log_p.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)  # (...)
    if weight is None:
        w_true = torch.ones_like(nll_true)
        smooth = -log_p.sum(dim=-1)                                      # sum_c -log p_c
    else:
        w_true = weight.to(log_p.dtype)[safe_target]
        smooth = -(log_p * weight.to(log_p.dtype)).sum(dim=-1)           # sum_c w_c (-log p_c)
    loss = (1.0 - smoothing) * w_true * nll_true + (smoothing / n_classes) * smooth
    zero = torch.zeros_like(loss)
    return torch.where(keep, loss, zero), torch.where(keep, w_true, zero)


def check_smoothing(smoothing: float) -> None:
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label_smoothing = {smoothing} must be in [0, 1)")


@register("ce")
class CrossEntropyLoss(nn.Module):
    """Cross-entropy for classifier heads; equals ``F.cross_entropy`` with the same options.

    Args:
        weight: optional per-class weights, length C.
        ignore_index: target value with no loss (default ``polytask.core.data.batch.IGNORE_INDEX``).
        label_smoothing: eps, spread uniformly over all C classes (PyTorch convention).
        reduction: ``mean`` (weighted mean over labelled rows) or ``sum``.

    ``forward(logits (n, C), target (n,)) -> ()``. Unlike ``F.cross_entropy``, a batch whose
    targets are all ignored gives 0 (still attached to the graph), not NaN: a mixed batch may
    hold no labelled row of this task.
    """

    def __init__(self, weight: list[float] | Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                 label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        check_smoothing(label_smoothing)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction {reduction!r} must be one of 'mean', 'sum'")
        w = None if weight is None else torch.as_tensor(weight)
        if w is not None and not w.is_floating_point():
            w = w.to(torch.get_default_dtype())
        if w is not None and (w.ndim != 1 or bool((w < 0).any())):
            raise ValueError(f"class weight must be a 1-D non-negative vector, got {w.tolist()}")
        self.register_buffer("weight", w)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.ndim != 2:
            raise ValueError(f"ce expects logits (n, C), got {tuple(logits.shape)}")
        if self.weight is not None and self.weight.numel() != logits.shape[-1]:
            raise ValueError(f"{self.weight.numel()} class weights for {logits.shape[-1]} classes")
        loss, norm = smoothed_nll(logits, target, weight=self.weight,
                                  smoothing=self.label_smoothing, ignore_index=self.ignore_index)
        if self.reduction == "sum":
            return loss.sum()
        denom = norm.sum()
        if denom == 0:  # nothing labelled: 0 connected to the graph keeps backward() valid
            return logits.sum() * 0.0
        return loss.sum() / denom

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"
