"""Optimiser, learning-rate schedule and parameter freezing for the training loop.

* AdamW (Loshchilov & Hutter 2019) with the fused kernel where PyTorch has one for the
  device, else the multi-tensor ``foreach`` path; no weight decay on biases, norms and
  embeddings' scale-free parameters (1-d tensors), as is common practice (e.g. nanoGPT).
* Linear warmup then cosine (Loshchilov & Hutter 2017) or linear decay to
  ``min_lr_ratio · lr``.
* Layerwise freezing (train only the top N layers of each stack, Howard & Ruder 2018's
  gradual-unfreezing idea in its static form) and discriminative tuning (train only named
  parts, e.g. the decoder for generation tasks).
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
from torch import nn


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")


def make_optimizer(params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
                   betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel exists for CPU and CUDA in recent PyTorch; fall back to foreach.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


# A layer's parameters: ``encoder.layers.3.`` in an EncoderDecoder, ``slots.encoder_3.`` in a
# MultiTaskModel (one slot per layer, holding each sharing group's copy).
_LAYER = re.compile(r"(encoder|decoder)(?:\.layers\.|_)(\d+)\.")


def freeze(model: nn.Module, *, train_top_layers: int | None, train_only: list[str],
           n_layers: dict[str, int]) -> list[str]:
    """Set ``requires_grad`` per the freezing options; return the names left trainable.

    ``train_top_layers=N`` keeps only layers ``>= n_layers[stack] - N`` of each stack (and the
    heads, final norms and LM head) trainable; ``train_only`` keeps only parameters whose name
    contains one of the given substrings (e.g. ``["decoder", "lm_head"]``).
    """
    trainable = []
    for name, p in model.named_parameters():
        keep = True
        if train_only:
            keep = any(part in name for part in train_only)
        if keep and train_top_layers is not None:
            m = _LAYER.search(name)
            if m is not None:
                keep = int(m.group(2)) >= n_layers[m.group(1)] - train_top_layers
            elif "embed" in name:
                keep = False
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"freezing left nothing to train (train_top_layers={train_top_layers}, "
                         f"train_only={train_only})")
    return trainable
