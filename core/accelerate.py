"""The CPU accelerations, switched on at one visible place.

The teaching modules — attention, feed-forward, the backbone — are plain PyTorch
(``nn.Linear``, :func:`polytask.attention.scaled_dot_product_attention`). ::

    with accelerated(model):                     # what the training loop does
        loss = objective(model(batch)); ...
    with accelerated(model, inference=True):     # what generate / beam_search do
        ...

turns, for the block, every module of ``model`` that has a fast twin into that twin, in place
(its class changes; parameters, buffers, the state dict and ``isinstance`` stay as they were),
and turns them back when the block ends:

===========================  ============================================================
``MultiHeadAttention``       :class:`polytask.attention.fast.FastMultiHeadAttention`: fused
                             q/k/v (k/v) projections, products in oneDNN
``FeedForward``              :class:`FastFeedForward`: oneDNN, the activation inside the GEMM
                             when inferring
``GatedFeedForward``         :class:`FastGatedFeedForward`: oneDNN products
a Linear named ``lm_head``   :class:`polytask.attention.packed.FastLinear`: oneDNN
===========================  ============================================================

``inference=True`` adds a :func:`polytask.attention.packed.packed_weights` block (each weight
re-laid once for oneDNN and reused for the block: only right while no weight changes), and the
decoding functions add their fused step (:mod:`polytask.core.decoding.step`) and native kernels.
Every fast twin computes what its plain module computes, in another order of sums; the tests
compare them (values and gradients): tests/attention/test_fast.py, tests/core/test_accelerate.py.
Why these are faster, with figures: docs/benchmarks.md.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from polytask.attention.fast import FastMultiHeadAttention
from polytask.attention.multihead import MultiHeadAttention
from polytask.attention.packed import ACTIVATIONS, FastLinear, apply_linear, packed_weights
from polytask.core.model.feedforward import FeedForward, GatedFeedForward


class FastFeedForward(FeedForward):
    """:class:`FeedForward` through oneDNN: when inferring, relu / GELU run inside the first
    GEMM (a post-op); with autograd the products run in oneDNN and the activation after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation in ACTIVATIONS:
            h = apply_linear(self.wi, x, self.activation)
        else:
            h = self.act(apply_linear(self.wi, x))
        return apply_linear(self.wo, self.dropout(h) if self.training else h)


class FastGatedFeedForward(GatedFeedForward):
    """:class:`GatedFeedForward` with its three products through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(apply_linear(self.wi_0, x)) * apply_linear(self.wi_1, x)
        return apply_linear(self.wo, self.dropout(h) if self.training else h)


#: plain class -> its fast twin (a subclass that adds no state)
TWINS: dict[type, type] = {MultiHeadAttention: FastMultiHeadAttention, FeedForward: FastFeedForward,
                           GatedFeedForward: FastGatedFeedForward, nn.Linear: FastLinear}
PLAIN = {fast: plain for plain, fast in TWINS.items()}


def _root(model: Any) -> nn.Module | None:
    """The module to walk: ``model`` itself, the ``nn.Module`` a decoding wrapper holds (a
    cross-stitch view's ``model``), or None for a duck-typed model that is neither."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else None


def _is_output_projection(name: str) -> bool:
    """``lm_head`` itself, or an entry of a container registered as ``lm_head`` (the multi-task
    model's ``slots.lm_head.0``)."""
    parts = name.split(".")
    return parts[-1] == "lm_head" or (len(parts) > 1 and parts[-2] == "lm_head")


def _targets(root: nn.Module | None) -> Iterator[nn.Module]:
    for name, m in root.named_modules() if root is not None else ():
        if type(m) is nn.Linear and not _is_output_projection(name):
            continue   # other Linears (classifier heads, adapters) stay as they are
        if type(m) in TWINS:
            yield m


@contextlib.contextmanager
def accelerated(model: Any, *, inference: bool = False) -> Iterator[Any]:
    """Run the block with ``model``'s modules turned into their fast twins (module doc); with
    ``inference``, inside a packed-weights block too. Nested blocks are fine: a module already
    fast is left to the block that made it so. Yields ``model``."""
    swapped: list[nn.Module] = []
    for m in _targets(_root(model)):
        if type(m) in TWINS:            # a module reachable twice is swapped once
            m.__class__ = TWINS[type(m)]
            swapped.append(m)
    try:
        with packed_weights() if inference else contextlib.nullcontext():
            yield model
    finally:
        for m in swapped:
            m.__class__ = PLAIN[type(m)]


def is_accelerated(module: nn.Module) -> bool:
    """Whether ``module`` is currently one of the fast twins."""
    return type(module) in PLAIN
