"""Classification head: pool the encoder states of a row, then a small MLP -> class logits.

Pooling (the two usual choices):
* ``mean`` over the real tokens only (padding excluded; Reimers & Gurevych 2019 found mean
  pooling the strongest sentence representation);
* ``first``: the state of the first token (BERT's [CLS], Devlin et al. 2019).

The MLP is BART's sentence-classification head (Lewis et al. 2020; Hugging Face
``BartClassificationHead``): ``out(dropout(tanh(dense(dropout(pooled)))))``.
"""
from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("mean", "first")


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str = "mean") -> torch.Tensor:
    """``(b, s, d)`` states and ``(b, s)`` bool mask (True = real token) -> ``(b, d)``.

    A row with no real token pools to zeros under ``mean`` (never NaN).
    """
    if how not in POOLINGS:
        raise ValueError(f"pooling {how!r} is not one of {', '.join(POOLINGS)}")
    if hidden.ndim != 3:
        raise ValueError(f"pool expects hidden (b, s, d), got {tuple(hidden.shape)}")
    if how == "first":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)                       # (b, s, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (b, d)


class ClassifierHead(nn.Module):
    """Pooled encoder states -> logits ``(b, n_classes)``.

    Args:
        d_model: width d of the encoder states.
        n_classes: number of labels C.
        hidden: width of the MLP's hidden layer (``None``: d_model).
        pooling: ``mean`` or ``first``.
        dropout: dropout before each linear layer.
    """

    def __init__(self, d_model: int, n_classes: int, hidden: int | None = None,
                 pooling: str = "mean", dropout: float = 0.0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"classifier pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if n_classes < 1:
            raise ValueError(f"a classifier head needs n_classes >= 1, got {n_classes}")
        hidden = hidden or d_model
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden (b, s, d)``, ``mask (b, s)`` bool -> logits ``(b, C)``."""
        x = pool(hidden, mask, self.pooling)                                  # (b, d)
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out(self.dropout(x))

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"
