"""``KVCache``: keys and values of the positions already decoded, for incremental decoding.

Self-attention appends one step's keys/values at a time into a preallocated buffer that grows
geometrically, so appending is O(1) amortised (no ``torch.cat`` of the whole history per
token). When gradients flow through the cache (e.g. a loss on incremental decoding), it
concatenates instead, since in-place writes into a buffer would break autograd.
Cross-attention keys/values depend only on the encoder output: they are computed on the first
step and reused (``static=True``).
"""
from __future__ import annotations

import torch


class KVCache:
    """Cache of ``(b, hk, j, d)`` keys and ``(b, hk, j, e)`` values for one attention module."""

    def __init__(self, static: bool = False) -> None:
        self.static = static
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k.narrow(2, 0, self.length)

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v.narrow(2, 0, self.length)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` (new positions on dim 2); return all cached keys and values."""
        if self.static:
            raise ValueError("a static (cross-attention) cache is set once with set_static()")
        new = k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Differentiating through cached decoding: the in-place buffer writes below would
            # break autograd, so grow by concatenation (O(L) per step; training-time only).
            self._k = k if self._k is None else torch.cat([self.k, k], dim=2)
            self._v = v if self._v is None else torch.cat([self.v, v], dim=2)
            self.length += new
            return self._k, self._v
        self.reserve(new, k, v)
        # narrow + copy_: the same write as slice assignment, without its Python indexing cost
        self._k.narrow(2, self.length, new).copy_(k)
        self._v.narrow(2, self.length, new).copy_(v)
        self.length += new
        return self.k, self.v

    def reserve(self, new: int, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for ``new`` more positions of keys and values shaped like ``k``, ``v``
        ``(b, hk, *, d)``: the whole buffers ``(b, hk, capacity, d)``, whose first ``length``
        positions are the cache. A caller that writes positions ``length ..`` itself (the
        native decoding step) then adds ``new`` to ``length``."""
        if self._k is None or self.length + new > self._k.shape[2]:
            capacity = max(16, 2 * (self.length + new))
            grown_k = k.new_empty(k.shape[:2] + (capacity,) + k.shape[3:])
            grown_v = v.new_empty(v.shape[:2] + (capacity,) + v.shape[3:])
            if self._k is not None:
                grown_k[:, :, : self.length] = self.k
                grown_v[:, :, : self.length] = self.v
            self._k, self._v = grown_k, grown_v
        return self._k, self._v

    def set_static(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep ``k``, ``v`` for every later step, each in one contiguous block. The fused
        k/v projection returns them as interleaved views of one ``(b, j, 2·d)`` output, so
        every (row, head) of a view is ``j`` short pieces ``2·d`` apart; read once per step
        from memory, a single-query attention over them took 375 µs a call in greedy decoding
        of the benchmark model (docs/benchmarks.md) against 311 µs over contiguous copies, and
        ``generate`` got ~4% faster for a one-off copy."""
        self.static = True
        self._k, self._v, self.length = k.contiguous(), v.contiguous(), k.shape[2]

    @property
    def is_set(self) -> bool:
        return self._k is not None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (in that order), e.g. the surviving beams."""
        if self._k is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)
