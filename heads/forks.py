"""``fork(module)``: a structural copy of a module tree that shares every parameter and buffer.

Sharing plans give each group of tasks ONE module object per slot (:mod:`polytask.heads.plan`).
Some plans need something in between: a layer whose weights are shared by every task but
which holds one small per-task part — a task's gate over shared experts
(:mod:`polytask.heads.experts`), a task's LoRA on a shared linear
(:mod:`polytask.heads.task_adapters`). A fork gives each task its own module *objects* (so the
plan can route a task's rows, and a task's view, through its own object) while every tensor
inside stays the one shared tensor: an update through any fork is an update of all of them.
Then the per-task part is swapped into the task's fork::

    layer = backbone.encoder.layers[0]
    mine = fork(layer)
    mine.ffn = GatedExperts(...)                # only this fork's ffn differs
    assert mine.self_attn.q_proj.weight is layer.self_attn.q_proj.weight

``nn.Module.parameters()`` deduplicates by identity, so optimisers, parameter counts and
:func:`polytask.core.training.checkpoint.model_state` (which stores tied tensors once) see each
shared tensor once however many forks hold it.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn


def fork(module: nn.Module) -> nn.Module:
    """A new module tree shaped like ``module`` whose parameters and buffers ARE ``module``'s.

    Every submodule is a new object (so replacing a child of the fork leaves ``module``
    alone); plain attributes are copied shallowly; hooks are not carried over.
    """
    clone = copy.copy(module)                       # a new object with a copy of __dict__
    clone._parameters = OrderedDict(module._parameters)   # the same Parameter objects
    clone._buffers = OrderedDict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    clone._modules = OrderedDict((name, None if child is None else fork(child))
                                 for name, child in module._modules.items())
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                  "_load_state_dict_post_hooks", "_state_dict_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                  "_forward_hooks_always_called"):
        if hasattr(module, hooks):
            setattr(clone, hooks, OrderedDict())
    return clone


def shares_all(a: nn.Module, b: nn.Module) -> bool:
    """True if ``a`` and ``b`` hold the very same tensors under the same names."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k] is pb[k] for k in pa)
