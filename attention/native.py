"""Native CPU kernels for a cached decoding step: a linear layer for a few rows and a
single-query attention, in C++ (``attention/native.cpp``), built on first use.

Why: a decoding step of the benchmark model (batch 16, d_model 256, docs/benchmarks.md) runs
18 linear layers on 16 rows and six attentions of one query per row. Those calls are small,
and their weights, keys and values (~30-45 MB a step) do not stay in this machine's cache
from one step to the next, so each call reads its data from memory. PyTorch's kernels are
built for larger problems. Measured on the benchmark machine, with the data flushed from
cache before each call:

* a 256² oneDNN linear with a packed weight, 16 rows: ~110 µs; here ~30 µs (1024x256:
  ~145 against ~70 µs). Each call of oneDNN also has a fixed cost of ~25 µs;
* ``F.scaled_dot_product_attention`` with one query, 16 x 4 heads of 64, 128 keys: ~240 µs;
  here ~130 µs, which is what summing the keys and values takes (they are read once).

The kernels are plain loops (see the .cpp): a weight is re-laid once per decoding call into
panels of 32 output columns, so a tile of 8 rows x 32 columns keeps its partial sums in
registers while reading the panel once; the attention computes one (row, head) per task:
scores, softmax, weighted sum of values. Three *blocks* chain them with the norms, the cache
write and the residual, so that a pre-norm sublayer of a decoding step is one call
(``polytask.core.decoding.step`` uses them where they fit; its Python path is their twin and gives the
same numbers).

Twins: ``F.linear`` and ``F.scaled_dot_product_attention`` (tests/attention/test_native.py:
values over odd shapes and strided caches; the kernels never run with autograd, so there are
no gradients to compare). Nothing here changes what is computed, only the order of the sums.

Building needs a C++ compiler and ninja (the ``[native]`` extra); it takes ~30 s once per
machine, cached by PyTorch in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
under a name that hashes the source, the flags and the CPU, so a cache shared between machines
never runs code built for another CPU. When the build fails (no compiler), a warning names the
reason and everything runs PyTorch's kernels, as it does with ``POLYTASK_NATIVE=0``.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from polytask.attention.packed import ACTIVATIONS

SOURCE = Path(__file__).with_name("native.cpp")

#: more rows than this go to the caller's fallback (oneDNN), whose blocking suits large
#: products better: the kernel reads each weight panel from cache once per 8 rows. Measured on
#: the benchmark machine, data flushed from cache, 64 rows: 256² 60 against oneDNN's 119 µs,
#: 1024x256 203 against 270 µs; hot, 39 against 53 and 152 against 169 µs
MAX_ROWS = 64

_lock = threading.Lock()
_state: dict[str, object] = {}   # "module": the loaded extension or None once tried


def enabled() -> bool:
    """False when ``POLYTASK_NATIVE`` is ``0``/``false``/``off``/``no``."""
    return os.environ.get("POLYTASK_NATIVE", "1").strip().lower() not in ("0", "false", "off",
                                                                         "no")


def _arch_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return ["-march=native"]
    if machine in ("arm64", "aarch64"):
        return ["-mcpu=native"]
    return []


def _cpu_fingerprint() -> str:
    """What the compiler's ``native`` target depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines
                                 if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _ninja_on_path() -> None:
    """PyTorch's build runs ``ninja`` from PATH; the pip package's binary sits next to the
    interpreter, which is not on PATH when a virtualenv's python runs without activation."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return   # the build then fails with PyTorch's own message, and we fall back
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build():
    from torch.utils import cpp_extension
    _ninja_on_path()
    cflags = ["-O3", "-fopenmp", *_arch_flags()]
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(cflags), torch.__version__,
                                       _cpu_fingerprint()]).encode()).hexdigest()[:12]
    name = f"polytask_native_{digest}"
    build_dir = getattr(cpp_extension, "_get_build_directory", None)   # private: may go away
    if build_dir is None or not (Path(build_dir(name, False)) / f"{name}.so").exists():
        print(f"polytask: building native CPU kernels ({name}; once per machine, ~30 s)",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name, [str(SOURCE)], extra_cflags=cflags,
                              extra_ldflags=["-fopenmp"], verbose=False)


def kernels():
    """The built extension, or None when disabled or the build failed (warned once)."""
    if not enabled():
        return None
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                try:
                    _state["module"] = _build()
                except Exception as error:   # no compiler, no ninja, a failed build: fall back
                    warnings.warn(f"polytask: native CPU kernels unavailable, using PyTorch's "
                                  f"({type(error).__name__}: {error})".strip(), RuntimeWarning,
                                  stacklevel=2)
                    _state["module"] = None
    return _state["module"]


def _plain_f32(t: torch.Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_cpu and t.layout is torch.strided


def _no_autograd(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _tracing() -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    return torch.jit.is_tracing() or compiling()


class SmallRowsLinear:
    """``x -> act(F.linear(x, weight, bias))`` for many calls while the weight does not change,
    made with :func:`small_rows_linear`. Inputs of up to :data:`MAX_ROWS` rows (all dims but
    the last) run the native kernel; larger ones ``fallback`` (made on first need)."""

    def __init__(self, module, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None,
                 fallback: Callable[[], Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self._module, self._make_fallback, self._fallback = module, fallback, None
        self.out_features, self.in_features = weight.shape
        self.panels = module.pack_weight(weight.detach())
        self.bias = None if bias is None else bias.detach().contiguous()
        self.activate = None if activation is None else ACTIVATIONS[activation][1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > MAX_ROWS or x.dtype is not torch.float32 or not x.is_cpu:
            if self._fallback is None:
                self._fallback = self._make_fallback()
            return self._fallback(x)
        y = self._module.linear_small_rows(x.reshape(rows, self.in_features).contiguous(),
                                           self.panels, self.bias, self.out_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.activate is None else self.activate(y)


def small_rows_linear(weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                      fallback: Callable[[], Callable[[torch.Tensor], torch.Tensor]]
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A :class:`SmallRowsLinear` when the native kernels are built and can take the weight
    (CPU fp32, 2-d, no autograd), else ``fallback()``. ``activation``: a key of
    :data:`polytask.attention.packed.ACTIVATIONS` or None."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of "
                         f"{', '.join(ACTIVATIONS)} or None")
    tensors = (weight,) if bias is None else (weight, bias)
    if (weight.dim() == 2 and all(_plain_f32(t) for t in tensors) and _no_autograd(*tensors)
            and (bias is None or bias.shape == (weight.shape[0],)) and not _tracing()):
        module = kernels()
        if module is not None:
            return SmallRowsLinear(module, weight, bias, activation, fallback)
    return fallback()


def can_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when :func:`single_query_attention` takes these tensors: the kernels are built and
    :func:`single_query_fits`."""
    return single_query_fits(q, k, v) and kernels() is not None


def single_query_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The tensor half of :func:`can_attend` (for a caller that checked :func:`kernels` once):
    CPU fp32, one query per (row, head), a key and value head per query head, unit stride on
    the last dim, no autograd."""
    return (q.dim() == 4 and q.shape[2] == 1 and k.dim() == 4 and v.dim() == 4
            and _plain_f32(q) and _plain_f32(k) and _plain_f32(v)
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] > 0
            and q.shape[3] == k.shape[3]
            and q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
            and _no_autograd(q, k, v) and not _tracing())


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` for q ``(b, h, 1, d)``, k
    ``(b, h, j, d)``, v ``(b, h, j, e)`` (no mask) -> ``(b, h, 1, e)``. Check
    :func:`can_attend` first."""
    return kernels().single_query_attention(q, k, v, float(scale))
