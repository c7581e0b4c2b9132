"""Model merging: single-task fine-tunes of ONE initialisation combined into one multi-task
model without joint training. Pure functions on state dicts (``dict[str, Tensor]``).

Notation: theta_0 the initialisation (``base``), theta_t the fine-tune on task t
(``finetuned_list[t]``), tau_t = theta_t - theta_0 its *task vector*, lambda the ``scale``.

* task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"):
  theta = theta_0 + lambda * sum_t tau_t;
* TIES (Yadav et al. 2023, "TIES-Merging: resolving interference"): trim, elect, disjoint mean
  (:func:`trim`, :func:`elect_sign`, :func:`disjoint_mean`); theta = theta_0 + lambda * tau_m;
* DARE (Yu et al. 2024, "Language models are Super Mario"): each tau_t's coordinates are
  dropped with probability p and the rest rescaled by 1 / (1 - p) (:func:`drop_and_rescale`),
  so E[dropped tau_t] = tau_t; the dropped vectors are then combined by task arithmetic
  (``combine="sum"``) or TIES (``combine="ties"``).

Details follow the authors' code: TIES trims each task vector over ALL its coordinates at once
(the state dict flattened in sorted key order, as ``state_dict_to_vector`` in
prateeky2806/ties-merging), not tensor by tensor; DARE draws its mask tensor by tensor
(``mask_input_with_mask_rate`` in yule-BUAA/MergeLM), in ``base``'s key order, task after task,
from one generator seeded with ``seed``.

Arithmetic runs in float64 and the result is cast back to ``base``'s dtype, so that merging one
model with scale 1 (TIES density 1, DARE drop 0) returns its weights bit for bit. Non-floating
tensors (integer buffers) are not merged: they must equal the base's, which is kept.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]

METHODS = ("task_arithmetic", "ties", "dare")
COMBINES = ("sum", "ties")
#: the options each method takes (besides base and the fine-tunes)
OPTIONS = {"task_arithmetic": ("scale",), "ties": ("density", "scale"),
           "dare": ("drop", "seed", "scale", "combine", "density")}


# --- checks ---------------------------------------------------------------------------------

def _check_states(base: StateDict, finetuned_list: list[StateDict]) -> None:
    """Every fine-tune has exactly ``base``'s keys and shapes; one line per problem kind."""
    if not isinstance(finetuned_list, (list, tuple)) or not finetuned_list:
        raise ValueError("merging needs at least one fine-tuned state dict, got "
                         f"{type(finetuned_list).__name__} of length "
                         f"{len(finetuned_list) if hasattr(finetuned_list, '__len__') else '?'}")
    for i, state in enumerate(finetuned_list):
        missing = [k for k in base if k not in state]
        unexpected = [k for k in state if k not in base]
        shapes = [f"{k}: {tuple(state[k].shape)} vs base {tuple(base[k].shape)}"
                  for k in base if k in state and state[k].shape != base[k].shape]
        parts = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
            ([f"unexpected tensors: {', '.join(unexpected)}"] if unexpected else []) + \
            ([f"mis-shaped tensors: {'; '.join(shapes)}"] if shapes else [])
        if parts:
            raise ValueError(f"finetuned_list[{i}] does not match the base state dict: "
                             + " | ".join(parts))
        for k, t in base.items():
            if not t.is_floating_point() and not torch.equal(state[k], t):
                raise ValueError(f"finetuned_list[{i}][{k!r}]: a non-floating tensor "
                                 f"({t.dtype}) that differs from the base's; only floating "
                                 "tensors can be merged")


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale = {scale!r}; expected a finite number (e.g. 1.0)")
    return float(scale)


def _check_fraction(name: str, value: float, *, low_open: bool) -> float:
    """``density`` in (0, 1] or ``drop`` in [0, 1)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        ((0 < value <= 1) if low_open else (0 <= value < 1))
    if not ok:
        allowed = "(0, 1]" if low_open else "[0, 1)"
        raise ValueError(f"{name} = {value!r}; expected a number in {allowed}")
    return float(value)


# --- task vectors ---------------------------------------------------------------------------

def _floating(base: StateDict) -> list[str]:
    return [k for k, t in base.items() if t.is_floating_point()]


def task_vectors(base: StateDict, finetuned_list: list[StateDict]) -> list[StateDict]:
    """tau_t = theta_t - theta_0 for every fine-tune (floating tensors only, in float64)."""
    _check_states(base, finetuned_list)
    keys = _floating(base)
    return [{k: state[k].double() - base[k].double() for k in keys} for state in finetuned_list]


def _apply(base: StateDict, merged: StateDict, scale: float) -> StateDict:
    """theta_0 + scale * merged, cast to the base's dtypes; non-floating tensors copied."""
    return {k: (t.double() + scale * merged[k]).to(t.dtype) if k in merged else t.clone()
            for k, t in base.items()}


def _sum(vectors: list[StateDict]) -> StateDict:
    return {k: torch.stack([v[k] for v in vectors]).sum(0) for k in vectors[0]}


def task_arithmetic(base: StateDict, finetuned_list: list[StateDict],
                    scale: float = 1.0) -> StateDict:
    """theta = theta_0 + scale * sum_t tau_t (Ilharco et al. 2023, eq. 1 summed over tasks)."""
    scale = _check_scale(scale)
    return _apply(base, _sum(task_vectors(base, finetuned_list)), scale)


# --- TIES -----------------------------------------------------------------------------------

def flatten(vectors: list[StateDict]) -> torch.Tensor:
    """``(k, d)``: each state dict as one row, its tensors in sorted key order."""
    keys = sorted(vectors[0])
    return torch.stack([torch.cat([v[k].reshape(-1) for k in keys]) for v in vectors])


def unflatten(row: torch.Tensor, like: StateDict) -> StateDict:
    """The inverse of :func:`flatten` for one row, shaped like ``like``."""
    out, start = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = row[start:start + n].reshape(like[k].shape)
        start += n
    return out


def trim(taus: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1, ``(k, d) -> (k, d)``: each row keeps its largest-magnitude coordinates,
    the rest become 0. As in the authors' ``topk_values_mask``: the threshold is the
    ``(d - int(d * density))``-th smallest magnitude of the row and every coordinate at least
    that large is kept, i.e. ``int(d * density) + 1`` coordinates (more on ties); density 1
    keeps everything."""
    d = taus.shape[1]
    if density >= 1:
        return taus.clone()
    rank = d - int(d * density)
    threshold = taus.abs().kthvalue(rank, dim=1, keepdim=True).values
    return taus * (taus.abs() >= threshold)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES step 2, ``(k, d) -> (d,)``: gamma_m = sign(sum_t trimmed tau_t) (the sign of the
    larger total mass); a coordinate whose sum is 0 gets the majority of the elected signs
    (the authors' ``resolve_zero_signs(..., "majority")``)."""
    sign = trimmed.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    return sign


def disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES step 3, ``(k, d), (d,) -> (d,)``: per coordinate, the mean of the trimmed values
    whose sign agrees with the elected one (zeros never count; no agreeing value gives 0)."""
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    count = (selected != 0).sum(0).clamp(min=1)
    return selected.sum(0) / count


def _ties_vector(vectors: list[StateDict], density: float) -> StateDict:
    trimmed = trim(flatten(vectors), density)
    return unflatten(disjoint_mean(trimmed, elect_sign(trimmed)), vectors[0])


def ties(base: StateDict, finetuned_list: list[StateDict], *, density: float = 0.2,
         scale: float = 1.0) -> StateDict:
    """theta = theta_0 + scale * tau_m with tau_m = disjoint_mean(trim(tau), elect(trim(tau)))
    (Yadav et al. 2023, Algorithm 1; the paper's k = density, its lambda = scale)."""
    density = _check_fraction("density", density, low_open=True)
    scale = _check_scale(scale)
    return _apply(base, _ties_vector(task_vectors(base, finetuned_list), density), scale)


# --- DARE -----------------------------------------------------------------------------------

def drop_and_rescale(tau: torch.Tensor, drop: float, generator: torch.Generator
                     ) -> torch.Tensor:
    """DARE on one tensor: m ~ Bernoulli(drop) per coordinate, tau * (1 - m) / (1 - drop).
    The mask is drawn in float32 whatever ``tau``'s dtype (one random stream for every
    precision)."""
    mask = torch.bernoulli(torch.full(tau.shape, drop, dtype=torch.float32), generator=generator)
    return tau * (1 - mask.to(tau.dtype)) / (1 - drop)


def dare(base: StateDict, finetuned_list: list[StateDict], *, drop: float, seed: int = 0,
         scale: float = 1.0, combine: str = "sum", density: float = 1.0) -> StateDict:
    """theta = theta_0 + scale * combine_t(DARE(tau_t)) (Yu et al. 2024, eq. 2-3): ``combine``
    ``sum`` is task arithmetic, ``ties`` is TIES (trim at ``density``, default 1: no trim)."""
    drop = _check_fraction("drop", drop, low_open=False)
    scale = _check_scale(scale)
    if combine not in COMBINES:
        raise ValueError(f"combine = {combine!r}; choose one of {', '.join(COMBINES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed = {seed!r}; expected an integer")
    density = _check_fraction("density", density, low_open=True)
    generator = torch.Generator().manual_seed(seed)
    dropped = [{k: drop_and_rescale(v, drop, generator) for k, v in tau.items()}
               for tau in task_vectors(base, finetuned_list)]
    merged = _sum(dropped) if combine == "sum" else _ties_vector(dropped, density)
    return _apply(base, merged, scale)


# --- one entry point ------------------------------------------------------------------------

def merge(method: str, base: StateDict, finetuned_list: list[StateDict],
          **options: Any) -> StateDict:
    """``method`` (one of :data:`METHODS`) with its :data:`OPTIONS`; an unknown method or an
    option the method does not take is a ``ValueError`` listing the choices."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = [k for k in options if k not in OPTIONS[method]]
    if unknown:
        raise ValueError(f"merge method {method!r} takes no option {unknown[0]!r}; its options: "
                         f"{', '.join(OPTIONS[method])}")
    function = {"task_arithmetic": task_arithmetic, "ties": ties, "dare": dare}[method]
    params = inspect.signature(function).parameters
    needed = [k for k in OPTIONS[method] if params[k].default is inspect.Parameter.empty
              and k not in options]
    if needed:
        raise ValueError(f"merge method {method!r} needs option {needed[0]!r} (no default); "
                         f"its options: {', '.join(OPTIONS[method])}")
    return function(base, finetuned_list, **options)
