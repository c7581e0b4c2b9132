"""Token-level negative log-likelihood for generation heads (``generative``).

Only target tokens count (labels != IGNORE_INDEX: padding and rows without a text target are
ignored). Two reductions, because the literature uses both and they weight long targets
differently:

* ``token`` (default): mean over every target token in the batch — long sequences weigh more
  (fairseq / Hugging Face default);
* ``sequence``: sum of token losses per sequence, then mean over the sequences that have at
  least one target token — each example weighs the same, its loss is its full log-likelihood.

Label smoothing follows the same convention as :mod:`polytask.losses.cross_entropy` (PyTorch's).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.attention.packed import plain_linear
from polytask.core.data.batch import IGNORE_INDEX
from polytask.core.model.transformer import EncoderDecoder
from polytask.losses.cross_entropy import check_smoothing, smoothed_nll
from polytask.losses.linear_ce import linear_cross_entropy
from polytask.losses.registry import register


def fusable_head(lm: Any) -> nn.Linear | None:
    """``lm.lm_head`` when ``lm.logits(h)`` is exactly ``lm_head(h * scale)`` for a plain, un-hooked
    ``nn.Linear`` (so the chunked loss computes the same thing); None otherwise (a LoRA-wrapped
    head, a model without the attribute, autocast, ...)."""
    head = getattr(lm, "lm_head", None)
    if (not isinstance(lm, EncoderDecoder) or type(lm).logits is not EncoderDecoder.logits
            or not plain_linear(head) or torch.is_autocast_enabled(head.weight.device.type)):
        return None
    return head


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

    def from_hidden(self, hidden: Tensor, lm: Any, labels: Tensor) -> Tensor:
        """The same loss as ``self(lm.logits(hidden), labels)``, computed from the final decoder
        states ``(n, t, d)`` by :func:`polytask.losses.linear_ce.linear_cross_entropy` without holding the
        ``(n, t, V)`` logits when ``lm``'s head allows it (:func:`fusable_head`), else by that
        obvious twin."""
        head = fusable_head(lm)
        if head is None:
            return self(lm.logits(hidden), labels)
        if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
            raise ValueError(f"generative expects hidden (n, t, d) and labels (n, t), got "
                             f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
        if lm.config.rescale_tied_output:
            hidden = hidden * lm.config.d_model ** -0.5
        is_token = labels != self.ignore_index
        if self.reduction == "token":
            count = is_token.sum()
        else:
            count = (is_token.sum(dim=1) > 0).sum()               # sequences with a target
        token_weight = is_token.to(hidden.dtype) / count.clamp(min=1).to(hidden.dtype)
        return linear_cross_entropy(hidden, head.weight, head.bias, labels, token_weight,
                                    smoothing=self.label_smoothing, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
