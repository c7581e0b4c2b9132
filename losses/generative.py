"""Token-level negative log-likelihood for generation heads (``generative``).

Only target tokens count (labels != IGNORE_INDEX: padding and rows without a text target are
ignored). Two reductions, because the literature uses both and they weight long targets
differently:

* ``token`` (default): mean over every target token in the batch — long sequences weigh more
  (fairseq / Hugging Face default);
* ``sequence``: sum of token losses per sequence, then mean over the sequences that have at
  least one target token — each example weighs the same, its loss is its full log-likelihood.

Label smoothing follows the same convention as :mod:`losses.cross_entropy` (PyTorch's).
"""
from __future__ import annotations

from torch import Tensor, nn

from core.batch import IGNORE_INDEX
from losses.cross_entropy import check_smoothing, smoothed_nll
from losses.registry import register


@register("generative")
class GenerativeLoss(nn.Module):
    """``forward(logits (n, t, V), labels (n, t)) -> ()``.

    Args:
        reduction: ``token`` or ``sequence`` (see module docstring).
        label_smoothing: eps spread uniformly over the V vocabulary entries.
        ignore_index: label value that is not a target token.

    Returns 0 connected to the graph when the batch holds no target token (never NaN).
    """

    def __init__(self, reduction: str = "token", label_smoothing: float = 0.0,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if reduction not in ("token", "sequence"):
            raise ValueError(f"reduction {reduction!r} must be one of 'token', 'sequence'")
        check_smoothing(label_smoothing)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.ndim != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"generative expects logits (n, t, V) and labels (n, t), got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        loss, is_token = smoothed_nll(logits, labels, smoothing=self.label_smoothing,
                                      ignore_index=self.ignore_index)   # (n, t) each
        if self.reduction == "token":
            n_tokens = is_token.sum()
            if n_tokens == 0:
                return logits.sum() * 0.0
            return loss.sum() / n_tokens
        has_target = is_token.sum(dim=1) > 0                          # (n,)
        if not bool(has_target.any()):
            return logits.sum() * 0.0
        per_sequence = loss.sum(dim=1)                                # (n,)
        return per_sequence[has_target].mean()

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
