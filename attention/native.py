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
machine, cached in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under a name
that hashes the source, the flags, torch, Python and the CPU, so a cache shared between machines
never runs code built for another CPU, and the source file's path, so two checkouts on one
machine never rebuild each other's kernels. When the build fails (no compiler), a warning names
the reason and everything runs PyTorch's kernels, as it does with ``POLYTASK_NATIVE=0``.

One build at a time: PyTorch guards a build with a ``lock`` file in the build directory, which
a killed build leaves behind, and every later load then waits for it forever. So a process
first takes an ``flock`` on ``NAME.lock`` next to the build directory (:func:`build_lock`); the
kernel drops it when its holder dies, so it cannot go stale, and whoever holds it knows that a
``lock`` file found in the build directory belongs to a dead build, whose directory it removes
to start the build over. A process that waits says
so on stderr, and gives up after ``POLYTASK_NATIVE_BUILD_TIMEOUT`` seconds (default 600),
warning and running PyTorch's kernels.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

try:
    import fcntl
except ImportError:   # not POSIX (Windows): PyTorch's own guard alone
    fcntl = None

import torch

from polytask.attention.packed import ACTIVATIONS

SOURCE = Path(__file__).with_name("native.cpp")

#: more rows than this go to the caller's fallback (oneDNN), whose blocking suits large
#: products better: the kernel reads each weight panel from cache once per 8 rows. Measured on
#: the benchmark machine, data flushed from cache, 64 rows: 256² 60 against oneDNN's 119 µs,
#: 1024x256 203 against 270 µs; hot, 39 against 53 and 152 against 169 µs
MAX_ROWS = 64

#: how long a process waits for another one's build before running PyTorch's kernels
BUILD_TIMEOUT_ENV = "POLYTASK_NATIVE_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 600.0

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


def extension_name(cflags: list[str], source: Path = SOURCE) -> str:
    """The extension's cache name: a hash of what its binary depends on (the source, the flags,
    torch, Python, the CPU) and of the source's resolved path, so that each checkout on a
    machine has its own build (their sources may differ; under one name each would rebuild
    over the other's)."""
    parts = [source.read_text(), " ".join(cflags), torch.__version__, sys.version,
             _cpu_fingerprint(), str(source.resolve())]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    return f"polytask_native_{digest}"


def build_root() -> Path:
    """Where extensions are built: ``TORCH_EXTENSIONS_DIR``, else PyTorch's per-user cache."""
    from torch.utils import cpp_extension
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def build_timeout() -> float:
    """Seconds to wait for another process's build: ``POLYTASK_NATIVE_BUILD_TIMEOUT``."""
    raw = os.environ.get(BUILD_TIMEOUT_ENV, str(DEFAULT_BUILD_TIMEOUT))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:
        raise ValueError(f"{BUILD_TIMEOUT_ENV}={raw!r}: expected a number of seconds >= 0 "
                         f"(default {DEFAULT_BUILD_TIMEOUT:g})")
    return seconds


@contextmanager
def build_lock(build_dir: Path, timeout: float, poll: float = 0.2) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``build_dir`` + ``.lock`` while building and loading.

    The kernel releases a flock when its holder dies, however it dies, so this lock never goes
    stale, and while we hold it no other process of ours is building here: a PyTorch ``lock``
    file found in ``build_dir`` was left by a killed build, and is removed with that build's
    half-written outputs. Waits at most ``timeout`` seconds, saying so once on stderr, then
    raises ``TimeoutError``. The lock file stays (removing it would let a waiter lock a file
    that no longer has a name); it holds the pid of the process that last held it."""
    if fcntl is None:
        yield
        return
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    path = build_dir.with_name(build_dir.name + ".lock")
    with open(path, "a+") as f:
        _wait_for_lock(f, build_dir, timeout, poll)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _remove_dead_build(build_dir)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_for_lock(f: IO[str], build_dir: Path, timeout: float, poll: float) -> None:
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        f.seek(0)
        holder = f.read().strip() or "?"
        if not waited:
            print(f"polytask: waiting for the native-kernel build in {build_dir} (pid {holder}) "
                  f"...", file=sys.stderr, flush=True)
            waited = True
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"waited {timeout:g} s for the native-kernel build in {build_dir} "
                               f"(pid {holder}); set {BUILD_TIMEOUT_ENV} to wait longer")
        time.sleep(min(poll, left))


def _remove_dead_build(build_dir: Path) -> None:
    """PyTorch's baton (``build_dir/lock``) while we hold the flock: its build was killed."""
    if (build_dir / "lock").exists():
        print(f"polytask: removing the native-kernel build of a killed process in {build_dir}",
              file=sys.stderr, flush=True)
        shutil.rmtree(build_dir)


def _cflags() -> list[str]:
    return ["-O3", "-fopenmp", *_arch_flags()]


def build_directory() -> Path:
    """This checkout's build directory; its lock file is the sibling ``NAME.lock``."""
    return build_root() / extension_name(_cflags())


def _build():
    from torch.utils import cpp_extension
    _ninja_on_path()
    cflags = _cflags()
    name = extension_name(cflags)
    build_dir = build_root() / name
    with build_lock(build_dir, build_timeout()):
        if not (build_dir / f"{name}.so").exists():
            print(f"polytask: building native CPU kernels ({name}; once per machine, ~30 s)",
                  file=sys.stderr, flush=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=cflags,
                                  extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                                  verbose=False)


def kernels():
    """The built extension, or None when disabled, the build failed or another process's build
    did not finish within :func:`build_timeout` (warned once)."""
    if not enabled():
        return None
    if "module" not in _state:
        build_timeout()   # a malformed setting is the user's error, not a failed build
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
