"""The task-weighting interface shared by every method, and the one place where per-task
gradients are computed.

A weighting turns the per-task losses of one training step into parameter gradients. Some
methods only choose weights w_i for the objective sum_i w_i L_i (static, uncertainty, DWA,
GradNorm, FAMO); others combine per-task gradients directly (PCGrad). Both fit one call:

    weights = weighting.backward(losses, shared_params, extra=penalty)
    optimizer.step()

Interface (every method):
    Weighting(task_names, **options, gradient_reducer=None)
        ``task_names``: every task of the run, in the run's order (k tasks).
        ``options``: the method's own settings (the run config's ``weighting.options``).
        ``gradient_reducer``: keyword-only, set by the training loop, never by a config: a
        callable applied to the stacked ``(k, P)`` per-task gradients before any surgery or
        norm uses them (under data parallelism
        :func:`polytask.core.training.distributed.average`, so every rank sees the gradients of
        the global batch); ``None`` (default) leaves them as computed. It is kept on the
        instance (``weighting.gradient_reducer``), not in the ``state_dict``: a process
        function, not training state.
    backward(losses, shared_params, *, extra=None, last_shared=None) -> dict[str, float]
        ``losses``: task name -> scalar loss of this step. Tasks absent from the dict (a mixed
        batch without rows of that task, partial labels) contribute nothing and their state
        is left alone. Names not in ``task_names`` raise ``ValueError``.
        ``shared_params``: the parameters shared by the tasks (``model.shared_parameters()``);
        gradient-surgery methods act on these only, other parameters get the plain gradient.
        ``extra``: an unweighted scalar added to the objective (coupling / orthogonality /
        adversarial terms); it is never reweighted or projected.
        ``last_shared``: GradNorm's W, the parameters of the last shared layer; default
        ``[shared_params[-1]]``. Ignored by the other methods.
        Accumulates gradients into ``.grad`` (like ``loss.backward()``; the loop zeroes them)
        and returns the weight each present task received, for logging.
    end_epoch(mean_losses)   epoch-level mean loss per task (the loop calls it at each evaluation;
                             every built-in method ignores it: DWA averages over windows of steps).
    after_step(new_losses)   losses of the same tasks after the optimizer step (FAMO).

Parameters: ``weighting.parameters()`` holds exactly what the training loop must add to its
optimizer (uncertainty's log-variances). Methods with their own update rule (GradNorm's
weights, FAMO's logits, DWA's loss history) keep their state in buffers, so it is saved in the
``state_dict`` but never touched by the model's optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


GradientReducer = Callable[[Tensor], Tensor]
"""``(k, P)`` per-task gradients -> ``(k, P)`` reduced ones (e.g. averaged over data-parallel ranks)."""


def task_gradients(losses: dict[str, Tensor], params: Sequence[Tensor], *,
                   reduce: GradientReducer | None = None) -> dict[str, Tensor]:
    """Gradient of each task loss w.r.t. ``params``, flattened and concatenated: name -> ``(P,)``.

    Parameters a loss does not reach get zeros. The graph is retained so the caller can still
    backpropagate the total. This is the single place per-task gradients are formed: ``reduce``
    (a weighting passes its ``gradient_reducer``; under DDP the all-reduce average) is applied
    here to the stacked ``(k, P)`` gradients, before any surgery or norm uses them.
    """
    params = list(params)
    if not params:
        raise ValueError("per-task gradients need at least one shared parameter")
    out: dict[str, Tensor] = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params)])
    if reduce is not None and out:
        stacked = torch.stack(list(out.values()))
        reduced = reduce(stacked)
        if not isinstance(reduced, Tensor) or reduced.shape != stacked.shape:
            raise ValueError(f"the gradient reducer must return a tensor of shape "
                             f"{tuple(stacked.shape)} (k tasks, P parameters), got "
                             f"{getattr(reduced, 'shape', type(reduced).__name__)}")
        out = dict(zip(out, reduced.unbind(0)))
    return out


def add_flat_grad(params: Sequence[Tensor], flat: Tensor) -> None:
    """Add a flattened gradient vector ``(P,)`` into the ``.grad`` of ``params``."""
    offset = 0
    for p in params:
        piece = flat[offset:offset + p.numel()].view_as(p)
        p.grad = piece.clone() if p.grad is None else p.grad + piece
        offset += p.numel()


class Weighting(nn.Module):
    """Base class; see the module docstring for the interface every method follows.

    Subclasses that only choose loss weights implement :meth:`objective`; the default
    :meth:`backward` differentiates it (+ ``extra``). Subclasses take ``gradient_reducer``
    keyword-only, pass it to ``super().__init__``, and give ``self.gradient_reducer`` to every
    :func:`task_gradients` call.
    """

    def __init__(self, task_names: Sequence[str], *,
                 gradient_reducer: GradientReducer | None = None) -> None:
        super().__init__()
        if gradient_reducer is not None and not callable(gradient_reducer):
            raise TypeError(f"gradient_reducer must be a callable (k, P) tensor -> (k, P) tensor "
                            f"or None, got {gradient_reducer!r}; the training loop sets it, a run "
                            f"config cannot")
        # Stored past nn.Module.__setattr__ so that even an nn.Module reducer is not registered
        # as a submodule: never a parameter, buffer or state_dict entry.
        object.__setattr__(self, "gradient_reducer", gradient_reducer)
        names = list(task_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"task_names must be non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"task_names has duplicates: {names}")
        self.task_names = names
        self.index = {n: i for i, n in enumerate(names)}

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def present(self, losses: dict[str, Tensor] | dict[str, float]) -> list[str]:
        """The tasks of this step, in run order; unknown names raise ``ValueError``."""
        unknown = [n for n in losses if n not in self.index]
        if unknown:
            raise ValueError(f"losses for unknown tasks {unknown}; known: {', '.join(self.task_names)}")
        return [n for n in self.task_names if n in losses]

    def objective(self, losses: dict[str, Tensor]) -> tuple[Tensor | None, dict[str, float]]:
        """``(scalar to differentiate, weights used)`` for the tasks in ``losses``."""
        raise NotImplementedError(f"{type(self).__name__} must implement objective() or backward()")

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], *,
                 extra: Tensor | None = None,
                 last_shared: Sequence[nn.Parameter] | None = None) -> dict[str, float]:
        present = self.present(losses)
        total, weights = self.objective({n: losses[n] for n in present}) if present else (None, {})
        run_backward(total, extra)
        return weights

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        """Epoch-level mean task losses; only epoch-based methods (DWA) use them."""
        self.present(mean_losses)

    def after_step(self, new_losses: dict[str, Tensor] | dict[str, float]) -> None:
        """Losses observed after the optimizer step; only FAMO uses them."""
        self.present(new_losses)


def run_backward(total: Tensor | None, extra: Tensor | None) -> None:
    """Backpropagate ``total + extra``, skipping whatever is absent or constant."""
    terms = [t for t in (total, extra) if t is not None]
    if not terms:
        return
    objective = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    if objective.requires_grad:
        objective.backward()


def weighted_sum(losses: dict[str, Tensor], weights: dict[str, float | Tensor]) -> Tensor:
    """sum_i w_i L_i over the tasks in ``losses``."""
    terms = [weights[n] * loss for n, loss in losses.items()]
    if not terms:
        raise ValueError("weighted_sum needs at least one task loss")
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


@dataclass
class TaskGradients:
    """The per-task gradients of one step on the shared parameters, however they were formed
    (the joint graph's k ``autograd.grad`` calls, :func:`task_gradients`; or one pass over
    disjoint per-task graphs, :mod:`polytask.losses.weighting.engine`).

    ``names``: the present tasks, in run order (k of them). ``matrix``: ``(k, P)``, row i the
    gradient of task ``names[i]``'s loss on ``params`` (flattened, concatenated in order), after
    the weighting's ``gradient_reducer``. ``losses``: ``(k,)`` the detached task losses.
    ``last_shared``: the parameters of the last shared layer (GradNorm's W; a subset of
    ``params``, see :meth:`columns`), None for ``params[-1:]``.
    """

    names: list[str]
    matrix: Tensor
    params: list[Tensor]
    losses: Tensor
    last_shared: list[Tensor] | None = None

    def gramian(self) -> Tensor:
        """``G_ij = <g_i, g_j>``, ``(k, k)``, returned in float64 (computed in the gradients'
        dtype: converting a float32 ``(k, P)`` matrix first would cost more than the product)."""
        return (self.matrix @ self.matrix.T).double()

    def columns(self, subset: Sequence[Tensor]) -> Tensor:
        """The ``(k, P_subset)`` block of ``matrix`` for some of ``params`` (e.g. GradNorm's last
        shared layer), concatenated in ``subset``'s order."""
        offsets, start = {}, 0
        for p in self.params:
            offsets[id(p)] = (start, p.numel())
            start += p.numel()
        missing = [i for i, p in enumerate(subset) if id(p) not in offsets]
        if missing:
            raise ValueError(f"parameter {missing[0]} of the subset is not among the "
                             f"{len(self.params)} parameters the task gradients were taken on")
        return torch.cat([self.matrix[:, offsets[id(p)][0]:sum(offsets[id(p)])] for p in subset],
                         dim=1)


class GradientWeighting(Weighting):
    """Base of the methods that act on per-task gradients of the shared parameters.

    A subclass implements :meth:`combine` — ``TaskGradients -> (update (P,), weights (k,))`` —
    or, when its update is a combination ``sum_i c_i g_i`` fixed by the Gramian alone (MGDA,
    CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, UPGrad ...), just :meth:`coefficients`. The
    ``update`` replaces the plain sum on the shared parameters; every other trainable parameter
    (task heads, private layers) and the ``extra`` terms get ``sum_i w_i grad L_i`` with the
    returned ``weights`` (1 for methods that only project, such as PCGrad; the coefficients for
    MGDA and Nash-MTL, as in the authors' code, which backpropagates the weighted loss).

    :meth:`backward` is the reference path: the gradients come from ``k`` ``autograd.grad``
    calls on the joint graph. The training loop instead calls :meth:`combine` with gradients from
    one pass over per-task graphs (:func:`polytask.losses.weighting.engine.split_backward`) when
    the batch allows it; both give the same update.
    """

    def combine(self, grads: TaskGradients) -> tuple[Tensor, Tensor]:
        """``(update (P,), weights (k,))`` for the present tasks ``grads.names``."""
        c = self.coefficients(grads.gramian(), grads.losses, grads.names)
        return c.to(grads.matrix) @ grads.matrix, c

    def coefficients(self, gramian: Tensor, losses: Tensor, names: list[str]) -> Tensor:
        """``(k,)`` coefficients c of the update ``sum_i c_i g_i`` from the ``(k, k)`` float64
        Gramian and the ``(k,)`` losses of the present tasks ``names``."""
        raise NotImplementedError(f"{type(self).__name__} must implement combine() or "
                                  "coefficients()")

    def backward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], *,
                 extra: Tensor | None = None,
                 last_shared: Sequence[nn.Parameter] | None = None) -> dict[str, float]:
        present = self.present(losses)
        if not present:
            run_backward(None, extra)
            return {}
        losses = {n: losses[n] for n in present}
        shared = [p for p in shared_params if p.requires_grad]
        grads = task_gradients(losses, shared, reduce=self.gradient_reducer)
        matrix = torch.stack([grads[n] for n in present])
        detached = torch.stack([losses[n].detach().double() for n in present])
        last = [p for p in last_shared if p.requires_grad] if last_shared is not None else None
        update, weights = self.combine(TaskGradients(present, matrix, shared, detached, last))
        used = {n: float(w) for n, w in zip(present, weights)}
        # One backward of sum_i w_i L_i gives private parameters (and extra) their gradients;
        # on the shared ones, swap sum_i w_i g_i for the method's update.
        run_backward(weighted_sum(losses, used), extra)
        add_flat_grad(shared, update - weights.to(matrix) @ matrix)
        return used


class Seeded:
    """Mixin for a weighting that draws random numbers (PCGrad's order, GradDrop's masks, RLW's
    weights): ``self.generator``, seeded by :meth:`seed_generator`, whose state is the module's
    extra state, so it is saved in the ``state_dict`` and a resumed run continues the same
    sequence."""

    generator: torch.Generator

    def seed_generator(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
