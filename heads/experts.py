"""Mixtures of feed-forward experts with one gate per task: the ``mmoe`` and ``ple`` plans.

* MMoE (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
  Mixture-of-Experts"): every layer holds ``experts`` feed-forward experts shared by all
  tasks; task k mixes them per token with its own gate ``softmax(W_k h)``.
* PLE / CGC (Tang et al. 2020, "Progressive Layered Extraction", the single-level Customized
  Gate Control): ``shared_experts`` shared experts plus ``task_experts`` of the task's own;
  task k's gate mixes its own and the shared ones.

In a Transformer the experts are the feed-forward sublayers; attention, norms, embeddings and
the LM head are shared as in ``hard``. The plan gives every task its own layer object at each
encoder / decoder slot (:mod:`polytask.heads.plan`); :func:`mixture_transform` makes task k's
layer a :func:`polytask.heads.forks.fork` of the one base layer (every tensor shared) whose
``ffn`` is a :class:`GatedExperts` holding the SHARED expert list (the same objects for every
task), the task's own experts and the task's gate. Routing then sends a task's rows through
its own fork, and ``model.for_task(name)`` is a plain EncoderDecoder running its own gate.

Sparse gates (``top_k``): keep the k largest gate values per token and renormalise them (a
softmax over the kept logits), and run each expert only on the tokens that selected it
(``dispatch="sparse"``); ``dispatch="dense"`` runs every expert on every token and weights
them with the masked softmax: the slow, obvious twin, equal in values and gradients.

Initialisation: expert 0 (the first shared expert; with no shared experts, each task's first
own expert) is the layer's FFN as the backbone built it, so a pretrained FFN is kept; every
further expert is a copy of it when the backbone is pretrained ("sparse upcycling",
Komatsuzaki et al. 2022) and a fresh FFN otherwise. Gates start at zero: a uniform mixture.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from polytask.core.data.batch import Batch
from polytask.core.model.config import ModelConfig
from polytask.core.model.feedforward import build_feedforward
from polytask.heads.config import SharingConfig
from polytask.heads.forks import fork

Dispatch = Literal["sparse", "dense"]
MIXTURES = ("mmoe", "ple")


class Gate(nn.Module):
    """A task's gate logits ``W h``: ``(..., d)`` -> ``(..., n_experts)``; W starts at zero
    (uniform mixture) and has no bias, as in Ma et al. (2018)."""

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.t()


def gate_weights(logits: torch.Tensor, top_k: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits (..., e)`` -> (mixture weights, full softmax, selected bool), all ``(..., e)``.

    Without ``top_k`` the weights are the softmax over every expert; with it, the softmax over
    each token's k largest logits (the others masked to -inf: weight exactly 0)."""
    probs = torch.softmax(logits, -1)
    if top_k is None or top_k >= logits.shape[-1]:
        return probs, probs, torch.ones_like(logits, dtype=torch.bool)
    chosen = logits.topk(top_k, dim=-1).indices
    ones = torch.ones(chosen.shape, dtype=logits.dtype, device=logits.device)
    selected = torch.zeros_like(logits).scatter(-1, chosen, ones) > 0
    weights = torch.softmax(logits.masked_fill(~selected, float("-inf")), -1)
    return weights, probs, selected


def mix_experts(h: torch.Tensor, experts: list[nn.Module], weights: torch.Tensor,
                selected: torch.Tensor | None, dispatch: Dispatch = "sparse") -> torch.Tensor:
    """``sum_e weights[..., e] * experts[e](h)``: ``h (..., d)``, ``weights (..., e)`` ->
    ``(..., d)``.

    ``dense`` runs every expert on every token; ``sparse`` runs expert e only on the tokens
    with ``selected[..., e]`` (the others have weight 0) and adds its output back in place.
    ``selected=None``: every expert on every token (a dense gate). A traced graph (ONNX
    export) always takes the dense path: the sparse one's row sets depend on the data."""
    if dispatch not in ("sparse", "dense"):
        raise ValueError(f"dispatch = {dispatch!r} is invalid: expected 'sparse' or 'dense'")
    if dispatch == "dense" or selected is None or torch.jit.is_tracing():
        outs = torch.stack([e(h) for e in experts], -2)                 # (..., e, d)
        return (weights.unsqueeze(-1).to(outs.dtype) * outs).sum(-2)
    flat = h.reshape(-1, h.shape[-1])                                   # (n, d)
    w, sel = weights.reshape(-1, len(experts)), selected.reshape(-1, len(experts))
    out = flat.new_zeros(flat.shape)
    for e, expert in enumerate(experts):
        rows = sel[:, e].nonzero(as_tuple=True)[0]
        if len(rows):
            y = w[rows, e].unsqueeze(-1) * expert(flat[rows])
            out = out.index_add(0, rows, y.to(out.dtype))
    return out.reshape(h.shape)


@dataclass
class GateRecord:
    """A layer's last call: its input ``h`` ``(b, l, d)``, DETACHED, and ``selected``
    ``(b, l, e)``. The balance loss recomputes the gate from them (:func:`balance_loss`), so it
    trains the gates only and owns its graph: a one-pass per-task gradient method (PCGrad)
    backpropagates each task's graph, freeing it, before the extra terms. Never copied with
    the module."""

    h: torch.Tensor | None = None
    selected: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> "GateRecord":
        return GateRecord()


class GatedExperts(nn.Module):
    """A task's feed-forward sublayer: its gate over ``shared`` + ``own`` experts.

    Args:
        shared: the layer's shared experts (the same ModuleList object in every task's fork).
        own: this task's experts (PLE; empty for MMoE).
        gate: this task's gate over ``len(shared) + len(own)`` experts.
        top_k: experts kept per token, or None (dense mixture).
        labels: a name per expert for logs (``s0``, ``s1``, ... shared; ``<task>.0`` own).
        dispatch: ``sparse`` (fast) or ``dense`` (its twin); see :func:`mix_experts`.
    ``(b, l, d)`` -> ``(b, l, d)``; every call leaves its gates in ``self.record``.
    """

    def __init__(self, shared: nn.ModuleList, own: nn.ModuleList, gate: Gate,
                 top_k: int | None = None, labels: list[str] | None = None,
                 dispatch: Dispatch = "sparse") -> None:
        super().__init__()
        n = len(shared) + len(own)
        if gate.weight.shape[0] != n or n == 0:
            raise ValueError(f"gate over {gate.weight.shape[0]} experts for {len(shared)} shared "
                             f"+ {len(own)} own experts; they must agree and be >= 1")
        self.shared, self.own, self.gate = shared, own, gate
        self.top_k, self.dispatch = top_k, dispatch
        self.labels = labels or [f"e{i}" for i in range(n)]
        self.record = GateRecord()

    def experts(self) -> list[nn.Module]:
        return [*self.shared, *self.own]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights, _, selected = gate_weights(self.gate(h), self.top_k)
        self.record = GateRecord(h.detach(), selected)
        dense_gate = self.top_k is None or self.top_k >= len(self.shared) + len(self.own)
        return mix_experts(h, self.experts(), weights, None if dense_gate else selected,
                           self.dispatch)

    def extra_repr(self) -> str:
        return f"experts={self.labels}, top_k={self.top_k}, dispatch={self.dispatch}"


# --- building: the per-slot transform of build_model ------------------------------------
SlotTransform = Callable[[str, nn.Module, frozenset], "nn.Module | None"]


def _is_layer(slot: str) -> bool:
    stack, _, what = slot.partition(".")
    return stack in ("encoder", "decoder") and what.isdigit()


def mixture_transform(sharing: SharingConfig, config: ModelConfig, layers_of: dict[str, Any],
                      *, upcycle: bool) -> SlotTransform:
    """The ``mmoe`` / ``ple`` transform for :func:`polytask.heads.build.build_model`.

    ``layers_of``: task name -> its own backbone (its FFN is a PLE task's first own expert
    when there are no shared experts). ``upcycle``: further experts are copies of the layer's
    FFN (pretrained backbone) rather than fresh FFNs. Returns ``transform(slot, base, group)``
    -> task ``group``'s fork of ``base`` for a layer slot, None for every other slot."""
    mmoe = sharing.strategy == "mmoe"
    n_shared = sharing.experts if mmoe else sharing.shared_experts
    n_own = 0 if mmoe else sharing.task_experts
    shared_lists: dict[str, nn.ModuleList] = {}

    def new_expert(first: nn.Module) -> nn.Module:
        return copy.deepcopy(first) if upcycle else build_feedforward(config)

    def transform(slot: str, base: nn.Module, group: frozenset) -> nn.Module | None:
        if not _is_layer(slot):
            return None
        if len(group) != 1:
            raise ValueError(f"sharing.strategy = {sharing.strategy!r} needs one task per layer "
                             f"group at slot {slot!r}, got {sorted(group)}")
        (task,) = group
        if slot not in shared_lists:
            first = [base.ffn] if n_shared else []
            shared_lists[slot] = nn.ModuleList(
                first + [new_expert(base.ffn) for _ in range(n_shared - 1)])
        stack, i = slot.split(".")
        mine = getattr(layers_of[task], stack).layers[int(i)].ffn
        own = ([mine] if n_shared == 0 else [new_expert(base.ffn)]) if n_own else []
        own += [new_expert(base.ffn) for _ in range(n_own - len(own))]
        layer = fork(base)
        labels = [f"s{j}" for j in range(n_shared)] + [f"{task}.{j}" for j in range(n_own)]
        layer.ffn = GatedExperts(shared_lists[slot], nn.ModuleList(own),
                                 Gate(config.d_model, n_shared + n_own), sharing.top_k, labels)
        return layer

    return transform


# --- reading the gates: balance loss and gate table -------------------------------------
def gated_layers(model: Any) -> Iterator[tuple[str, int, str, GatedExperts]]:
    """``(slot, task index, task name, GatedExperts)`` of every gated layer a task runs."""
    for slot in model.plan.slots:
        if not _is_layer(slot):
            continue
        for k, spec in enumerate(model.tasks):
            if model.uses(spec.name, slot):
                ffn = getattr(model.module(slot, model.plan.group_index(slot, spec.name)),
                              "ffn", None)
                if isinstance(ffn, GatedExperts):
                    yield slot, k, spec.name, ffn


def _gates_on_real_tokens(slot: str, k: int, name: str, gated: GatedExperts, batch: Batch
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(probs, selected, mask) of task k's last call at ``slot`` on ``batch``, the full-softmax
    ``probs`` recomputed from the recorded input (on the gate's graph only); None when the
    batch has no row of the task. The record must come from ``model(batch)``."""
    rows = (batch.task_ids == k).nonzero(as_tuple=True)[0]
    if not len(rows):
        return None
    mask = (batch.src_mask if slot.startswith("encoder") else batch.tgt_mask)[rows]
    rec = gated.record
    if rec.h is None or rec.h.shape[:2] != mask.shape:
        got = None if rec.h is None else tuple(rec.h.shape[:2])
        raise RuntimeError(f"gates of task {name!r} at {slot}: recorded {got}, expected rows x "
                           f"length {tuple(mask.shape)}; run model(batch) on this batch first")
    return torch.softmax(gated.gate(rec.h), -1), rec.selected, mask


def balance_loss(model: Any, batch: Batch) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eq. 4), per (layer, task):
    ``n * sum_e f_e * P_e`` over the task's real tokens, where ``P_e`` is the mean full-softmax
    gate probability of expert e and ``f_e`` the fraction of the task's token-to-expert
    assignments that go to e (its top_k choices; a dense gate's argmax). 1 when balanced;
    the mean over every gated (layer, task) of ``batch``, after ``model(batch)``. Its gradient
    reaches the gate weights only (the gate's input is detached, :class:`GateRecord`)."""
    terms = []
    for slot, k, name, gated in gated_layers(model):
        found = _gates_on_real_tokens(slot, k, name, gated, batch)
        if found is None or not bool(found[2].any()):
            continue
        probs, selected, mask = found
        n = probs.shape[-1]
        if gated.top_k is None or gated.top_k >= n:
            load, per_token = nn.functional.one_hot(probs.argmax(-1), n).to(probs.dtype), 1
        else:
            load, per_token = selected.to(probs.dtype), gated.top_k
        m = mask.unsqueeze(-1).to(probs.dtype)
        tokens = m.sum()
        f = (load * m).sum((0, 1)) / (tokens * per_token)
        p = (probs * m).sum((0, 1)) / tokens
        terms.append(n * (f * p).sum())
    if not terms:
        return model.module("embedding", 0).embed_tokens.weight.new_zeros(())
    return torch.stack(terms).mean()


@torch.no_grad()
def gate_table(model: Any, batch: Batch) -> dict[str, Any] | None:
    """Mean mixture weight per (layer, task, expert) over the real tokens of ``batch``:
    ``{"layers": {slot: {task: {expert label: weight}}}}``, None for a model without gates.
    Runs ``model(batch)`` in eval mode (no dropout, no RNG drawn) and restores the mode."""
    if next(gated_layers(model), None) is None:
        return None
    was = model.training
    model.eval()
    try:
        model(batch)
        layers: dict[str, dict[str, dict[str, float]]] = {}
        for slot, k, name, gated in gated_layers(model):
            found = _gates_on_real_tokens(slot, k, name, gated, batch)
            if found is None or not bool(found[2].any()):
                continue
            probs, selected, mask = found
            kept = probs * selected
            weights = kept / kept.sum(-1, keepdim=True)
            mean = weights[mask].mean(0)
            layers.setdefault(slot, {})[name] = dict(zip(gated.labels, mean.tolist()))
    finally:
        model.train(was)
    return {"layers": layers}
