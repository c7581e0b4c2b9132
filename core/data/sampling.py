"""Mixture sampling: which task, and which of its examples, fills each row of a batch.

Rates (Raffel et al. 2020, T5, section 3.5.2; Arivazhagan et al. 2019 for temperature):
    proportional  p_k ∝ min(n_k, cap)              examples-proportional mixing
    temperature   p_k ∝ min(n_k, cap) ** (1 / T)   T = 1: proportional, T -> inf: uniform
    uniform       p_k = 1 / K
    round_robin   tasks in turn, k = position mod K (no randomness in the task choice)
A cap lowers a task's rate only; every one of its examples can still be drawn.

The sampler defines one infinite *global stream* of ``(task, example index)`` pairs that is a
pure function of the seed: task choices come in blocks drawn by ``default_rng([seed, block])``,
and the m-th draw of task k is ``perm_e[m mod n_k]`` with ``perm_e`` the e = m // n_k -th
shuffle of its examples (every epoch of a task sees each example once). Data-parallel rank r of
N takes pairs r, r + N, r + 2N, ...: N ranks drawing b / N rows each see exactly the b rows one
process draws. The state is the global position and per-task draw counts, so it is small,
JSON-serialisable and identical on every rank after the same number of rows.
"""
from __future__ import annotations

from typing import Any, Iterator, Literal

import numpy as np

Method = Literal["proportional", "temperature", "uniform", "round_robin"]
METHODS = ("proportional", "temperature", "uniform", "round_robin")
_BLOCK = 4096  # task choices drawn per rng call; part of the stream's definition


class MixtureSampler:
    """Deterministic, resumable, shardable multi-task sampler.

    Args:
        sizes: task name -> number of training examples (order = task order).
        method: one of ``proportional``, ``temperature``, ``uniform``, ``round_robin``.
        temperature: T for ``temperature`` sampling (> 0).
        cap: limit on n_k in the rates: one int for all tasks or task -> int.
        seed: defines the whole stream.
        rank, world_size: this data-parallel rank and the number of ranks.
    """

    def __init__(self, sizes: dict[str, int], method: Method = "proportional", *,
                 temperature: float = 2.0, cap: int | dict[str, int] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not sizes:
            raise ValueError("MixtureSampler needs at least one task")
        for task, n in sizes.items():
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"task {task!r} has {n!r} examples; every task needs at least one")
        if method not in METHODS:
            raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
        if not temperature > 0:
            raise ValueError(f"temperature ({temperature}) must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
        caps = cap if isinstance(cap, dict) else {t: cap for t in sizes} if cap is not None else {}
        for task, c in caps.items():
            if task not in sizes:
                raise ValueError(f"cap for unknown task {task!r}; tasks: {', '.join(sizes)}")
            if c is not None and c <= 0:
                raise ValueError(f"cap for task {task!r} ({c}) must be positive")
        self.tasks = list(sizes)
        self.sizes = dict(sizes)
        self.method, self.temperature, self.seed = method, float(temperature), seed
        self.caps = {t: c for t, c in caps.items() if c is not None}
        self.rank, self.world_size = rank, world_size
        self.probs = self._rates()
        self.position = 0                        # next index of the global stream
        self.counts = {t: 0 for t in self.tasks}  # draws of each task so far
        self._block: tuple[int, np.ndarray] | None = None
        self._perms: dict[str, tuple[int, np.ndarray]] = {}

    def _rates(self) -> np.ndarray:
        n = np.array([min(self.sizes[t], self.caps.get(t, self.sizes[t])) for t in self.tasks],
                     dtype=np.float64)
        if self.method == "temperature":
            n = n ** (1.0 / self.temperature)
        elif self.method in ("uniform", "round_robin"):
            n = np.ones_like(n)
        return n / n.sum()

    def rates(self) -> dict[str, float]:
        """Task -> probability of a row (round robin: its long-run share)."""
        return {t: float(p) for t, p in zip(self.tasks, self.probs)}

    def _task_at(self, position: int) -> int:
        if self.method == "round_robin":
            return position % len(self.tasks)
        block = position // _BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, block])
            self._block = (block, rng.choice(len(self.tasks), size=_BLOCK, p=self.probs))
        return int(self._block[1][position % _BLOCK])

    def _example(self, task: str, draw: int) -> int:
        n = self.sizes[task]
        epoch = draw // n
        if task not in self._perms or self._perms[task][0] != epoch:
            k = self.tasks.index(task)
            self._perms[task] = (epoch, np.random.default_rng([self.seed, 1 + k, epoch]).permutation(n))
        return int(self._perms[task][1][draw % n])

    def _advance(self) -> tuple[str, int]:
        task = self.tasks[self._task_at(self.position)]
        pair = (task, self._example(task, self.counts[task]))
        self.counts[task] += 1
        self.position += 1
        return pair

    def next_pair(self) -> tuple[str, int]:
        """This rank's next ``(task, example index)``; walks one group of ``world_size``
        global pairs so every rank's state stays identical."""
        group = [self._advance() for _ in range(self.world_size)]
        return group[self.rank]

    def next_batch(self, batch_size: int) -> list[tuple[str, int]]:
        """This rank's next ``batch_size`` rows (per-rank size; a batch may mix tasks)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size ({batch_size}) must be positive")
        return [self.next_pair() for _ in range(batch_size)]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        while True:
            yield self.next_pair()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; the same on every rank after the same number of rows."""
        return {"position": self.position, "counts": dict(self.counts), "seed": self.seed,
                "method": self.method, "sizes": dict(self.sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; the sampler must be configured as the one that saved it."""
        for key in ("seed", "method", "sizes"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state has {key} = {state.get(key)!r} but this sampler "
                                 f"has {getattr(self, key)!r}")
        if state["position"] % self.world_size:
            raise ValueError(f"sampler position {state['position']} is not a multiple of "
                             f"world_size ({self.world_size}); resume with the saving world size")
        self.position = int(state["position"])
        self.counts = {t: int(state["counts"][t]) for t in self.tasks}
