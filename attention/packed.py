"""Linear layers through oneDNN (CPU, fp32), with the weight pre-packed when inferring.

    y = x Wᵀ + b        exactly what ``F.linear`` computes, summed in another order
    y = act(x Wᵀ + b)   relu or GELU applied inside the GEMM (a feed-forward block's ``wi``)

Why faster: PyTorch's CPU ``F.linear`` calls the BLAS library it was built with (MKL for the
x86 wheels). oneDNN, which PyTorch also ships, was faster at this project's shapes on the
benchmark machine (an AMD EPYC VM; docs/benchmarks.md): a 2048² product at 200-226 against
135-166 GFLOP/s. It can also re-lay a weight once into the blocked format its GEMM kernels
stream best (``torch.ops.mkldnn._reorder_linear_weight``, the op ``torch.compile`` uses when
it freezes weights); without autograd the weights do not change from call to call, so the
packed copy is made once (on a weight's second use) and reused. A packed
``(16, 256) x (256, 8000)`` LM head took 0.6 ms against MKL's 2.0 ms with the weight not in
cache, and a greedy-decoding step of the benchmark model went from ~10 to ~6 ms.

:func:`linear` (and :func:`apply_linear` for an ``nn.Linear``) takes oneDNN for CPU fp32
tensors, a 2-d weight of at least :data:`MIN_WEIGHT_NUMEL` entries and an input of at least
2 dims, with no autocast, not while tracing or compiling, and with PyTorch built with oneDNN
(``torch.backends.mkldnn.is_available()`` and ``.enabled``); otherwise it is exactly
``F.linear``. Then:

* with autograd (training): :class:`_OneDNNLinear`, the forward product and the input
  gradient in oneDNN with the plain weight, the weight gradient with torch's ``mm``;
* without, inside a :func:`packed_weights` block (``generate``, ``beam_search`` and
  ``sequence_log_probs`` open one through :func:`polytask.core.accelerate.accelerated` with
  ``inference=True``): the packed weight, the activation in the GEMM;
* without, outside a block: the plain weight, the activation in the GEMM.

Why a block: a packed copy is only right while its weight is unchanged, and PyTorch's version
counter, which in-place ops bump, is not bumped by every update: a ``fused=True`` optimizer
step leaves it as it was. So packed copies live only for the block that made them (one
generation call, whose weights nothing changes) and are dropped when it ends. Inside the block
a different tensor, storage address or version still forces a new pack.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

#: ``.cache``: None outside a packed_weights block; inside, key -> (tensors, their addresses
#: and versions, value) for :func:`_block_entry`. One per thread.
_STATE = threading.local()
T = TypeVar("T")


def _ops_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


_AVAILABLE = _ops_available()


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


#: resolved once: these run for every linear layer of every decoding step
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_onednn_enabled = getattr(torch._C, "_get_mkldnn_enabled",
                          lambda: torch.backends.mkldnn.enabled)   # the flag behind it
_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)


#: smaller weights stay with ``F.linear``: a oneDNN call costs ~20 µs before any work against
#: MKL's ~4 µs, which a weight that fits in cache does not earn back (measured on the benchmark
#: machine: (128, 128) at 16 rows 13 vs 26 µs; (256, 256) 32 vs 29 µs; (1024, 256) 105 vs
#: 72 µs; a d_model 64 model's generate 37 vs 52 ms with every linear through oneDNN).
MIN_WEIGHT_NUMEL = 256 * 256


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU fp32 tensors, a 2-d weight of at least :data:`MIN_WEIGHT_NUMEL` entries, an input of
    at least 2 dims, oneDNN built and enabled, no autocast, not tracing or compiling.
    (Plain ``if``s, cheapest first: this runs for every linear layer of every decoding step.)"""
    f32 = torch.float32
    if not (_AVAILABLE and x.dtype is f32 and weight.dtype is f32 and x.is_cpu and weight.is_cpu):
        return False
    if bias is not None and (bias.dtype is not f32 or not bias.is_cpu):
        return False
    return (weight.numel() >= MIN_WEIGHT_NUMEL and weight.dim() == 2 and x.dim() >= 2
            and weight.layout is torch.strided
            and _onednn_enabled() and not _autocast_on() and not _tracing() and not _compiling())


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when :func:`linear` uses a packed copy of ``weight``: inside a
    :func:`packed_weights` block, no autograd needed, and oneDNN can take the tensors."""
    return (getattr(_STATE, "cache", None) is not None and not _needs_grad(x, weight, bias)
            and _onednn_ok(x, weight, bias))


def _version(t: torch.Tensor) -> int:
    # an inference tensor has no version counter; it cannot be changed outside inference mode
    return -1 if t.is_inference() else t._version


@contextlib.contextmanager
def packed_weights() -> Iterator[None]:
    """Within this block :func:`linear` packs each weight once and reuses the copy (and
    :func:`block_cached` values, e.g. fused q/k/v weights, are reused); all are dropped when
    the outermost block ends. Do not update weights in the block by anything that skips the
    version counter (e.g. a fused optimizer step)."""
    if getattr(_STATE, "cache", None) is not None:   # nested: the outer block's copies
        yield
        return
    _STATE.cache = {}
    try:
        yield
    finally:
        _STATE.cache = None


def _block_entry(key: tuple, tensors: tuple[torch.Tensor, ...], make: Callable[[], T]
                 ) -> tuple[T, bool]:
    """The current block's value under ``key`` and whether it was just made: ``make()`` runs
    again when any of ``tensors`` is another tensor, at another address or version than when
    the value was made. Needs an open :func:`packed_weights` block."""
    cache = _STATE.cache
    stamp = [(t.data_ptr(), _version(t)) for t in tensors]
    entry = cache.get(key)
    if (entry is not None and entry[1] == stamp
            and all([a is b for a, b in zip(entry[0], tensors)])):
        return entry[2], False
    value = make()
    cache[key] = (tensors, stamp, value)   # holding the tensors keeps their ids theirs
    return value, True


def block_cached(key: tuple, tensors: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, computed once per :func:`packed_weights` block while ``tensors`` are
    unchanged (see :func:`_block_entry`); outside a block, every call."""
    if getattr(_STATE, "cache", None) is None:
        return make()
    return _block_entry(key, tensors, make)[0]


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight ``(out, in)`` to hand oneDNN in the current :func:`packed_weights` block:
    on its first use the weight itself (oneDNN takes plain weights too, a little slower), from
    its second use on its packed copy, made once. A weight used once per block (an encoder
    layer's in one ``generate`` call) is so never copied; a decoder's is packed on step two."""
    holder, first_use = _block_entry(("packed", id(weight)), (weight,), dict)
    if first_use:
        return weight
    if "packed" not in holder:
        with torch.no_grad():
            holder["packed"] = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    return holder["packed"]


#: activations oneDNN can apply inside the GEMM (its post-op, algorithm) and their torch twins
ACTIVATIONS = {
    "relu": (("relu", ""), F.relu),
    "gelu": (("gelu", "none"), F.gelu),
    "gelu_tanh": (("gelu", "tanh"), lambda x: F.gelu(x, approximate="tanh")),
}


#: oneDNN's (post-op, algorithm) per activation, None included
_POST_OP = {None: ("none", ""), **{name: ops for name, (ops, _) in ACTIVATIONS.items()}}
#: the op's overload, resolved once (calling the overload packet costs ~5 µs more per call)
_linear_pointwise = torch.ops.mkldnn._linear_pointwise.default if _AVAILABLE else None


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` whose forward product runs in oneDNN (plain weight: it changes every
    training step, so a packed copy would not be reused). Backward: ``grad_x = g W`` in oneDNN
    too (``Wᵀ`` as its weight, a view), ``grad_W = gᵀ x`` and ``grad_b = Σ g`` with torch's
    (there oneDNN was slower). Measured on the benchmark step: 849 -> 820 ms for the oneDNN
    ``grad_x``. A ``create_graph`` backward computes ``grad_x`` with torch's matmul, so it is
    differentiable as usual."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.matmul(weight) if torch.is_grad_enabled()   # create_graph
                      else torch.ops.mkldnn._linear_pointwise(grad.contiguous(), weight.t(),
                                                              None, "none", [], ""))
        rows = grad.reshape(-1, grad.shape[-1])
        grad_w = rows.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` with ``act`` one of :data:`ACTIVATIONS` or None
    (identity). ``x`` ``(..., in)``, ``weight`` ``(out, in)``, ``bias`` ``(out,)`` ->
    ``(..., out)``. Where oneDNN can take the tensors: with autograd, the forward product in
    oneDNN (:class:`_OneDNNLinear`); without, inside a :func:`packed_weights` block, a packed
    weight with the activation fused into the GEMM, and outside one the plain weight.
    Otherwise ``F.linear``."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of "
                         f"{', '.join(ACTIVATIONS)} or None")
    if _onednn_ok(x, weight, bias):
        if _needs_grad(x, weight, bias):
            return _activate(_OneDNNLinear.apply(x, weight, bias), activation)
        attr, algorithm = _POST_OP[activation]
        if getattr(_STATE, "cache", None) is not None:
            weight = packed_weight(weight)
        return _linear_pointwise(x, weight, bias, attr, [], algorithm)
    return _activate(F.linear(x, weight, bias), activation)


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return y if activation is None else ACTIVATIONS[activation][1](y)


def reusable_linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
                    activation: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> act(F.linear(x, weight, bias))`` (``act`` as in :func:`linear`) for many calls
    without autograd while the weight does not change (the chunks of
    :func:`polytask.losses.linear_ce.linear_cross_entropy`, a :class:`polytask.core.decoding.step.DecodingStep`):
    with ``weight`` packed for oneDNN once, here, when :func:`linear` would use oneDNN for an
    input of the weight's dtype and device."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of "
                         f"{', '.join(ACTIVATIONS)} or None")
    probe = weight.new_empty((1, weight.shape[1]))
    if not (_onednn_ok(probe, weight, bias) and not _needs_grad(probe, weight, bias)):
        return lambda x: _activate(F.linear(x, weight, bias), activation)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    attr, algorithm = _POST_OP[activation]
    return lambda x: _linear_pointwise(x, packed, bias, attr, [], algorithm)


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear` (oneDNN where it applies). No state of
    its own: :func:`polytask.core.accelerate.accelerated` turns a model's output projection into
    it in place, and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def plain_linear(*projections: nn.Module) -> bool:
    """True when every module is an un-hooked ``nn.Linear`` or :class:`FastLinear` (not, e.g., a
    LoRA wrapper), so that a fast path computing with their ``weight`` and ``bias`` does exactly
    what calling them would."""
    return all(type(m) in (nn.Linear, FastLinear) and not (m._forward_hooks or m._forward_pre_hooks)
               for m in projections)


def apply_linear(module: nn.Module, x: torch.Tensor, activation: str | None = None
                 ) -> torch.Tensor:
    """``act(module(x))``; for a :func:`plain_linear`, :func:`linear` with its weight
    and bias (a LoRA wrapper or any other module is simply called)."""
    if plain_linear(module):
        return linear(x, module.weight, module.bias, activation)
    return _activate(module(x), activation)
