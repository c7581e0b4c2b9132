"""Controlled synthetic tasks whose relatedness is known by construction.

Sequences are space-separated symbols so that a subword tokenizer sees one piece per symbol.

    copy      "3 1 4 1 5"      -> "3 1 4 1 5"       digit sequences, length 3-8
    reverse   "3 1 4 1 5"      -> "5 1 4 1 3"       same inputs as copy, different map
    sort      "3 1 4 1 5"      -> "1 1 3 4 5"       same inputs, an order-aware map
    addition  "4 7 + 1 5"      -> "6 2"             digit-by-digit numbers of 1-3 digits
    parity    "1 0 1 1"        -> "odd" / "even"    bit strings, length 4-12 (count of ones)
    majority  "1 0 1 1 0"      -> "0" / "1"         bit strings of odd length 5-13

copy / reverse / sort share their input distribution and differ in the output map (closely
related generation tasks); parity / majority share theirs and both read the count of ones
(related classification tasks); addition is the odd one out. This mirrors the controlled
task families used to study transfer (e.g. the algorithmic tasks of Kaiser & Sutskever 2016
and the synthetic relatedness studies of Standley et al. 2020).

The data is generated once by this script from a seed and shipped, so that every task, built-in
or not, goes through :func:`polytask.core.data.task_data.load_task`:

    python -m polytask.experiments.suite.synthetic [--seed 0] [--train 2000] [--eval 200] [--out DIR]

Inputs are unique within a task, and the splits are disjoint.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Callable

from polytask.experiments.suite.catalog import SYN_INSTRUCTIONS as INSTRUCTIONS
from polytask.experiments.suite.writer import DATA_DIR, write_task

Row = dict[str, str]


def _digits(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(lo, hi))]


def _bits(rng: random.Random, lengths: list[int]) -> list[int]:
    return [rng.randrange(2) for _ in range(rng.choice(lengths))]


def _join(symbols: list) -> str:
    return " ".join(str(s) for s in symbols)


def _copy(rng: random.Random) -> Row:
    x = _digits(rng, 3, 8)
    return {"input": _join(x), "output": _join(x)}


def _reverse(rng: random.Random) -> Row:
    x = _digits(rng, 3, 8)
    return {"input": _join(x), "output": _join(x[::-1])}


def _sort(rng: random.Random) -> Row:
    x = _digits(rng, 3, 8)
    return {"input": _join(x), "output": _join(sorted(x))}


def _addition(rng: random.Random) -> Row:
    a, b = rng.randint(0, 10 ** rng.randint(1, 3) - 1), rng.randint(0, 10 ** rng.randint(1, 3) - 1)
    return {"input": f"{_join(list(str(a)))} + {_join(list(str(b)))}", "output": _join(list(str(a + b)))}


def _parity(rng: random.Random) -> Row:
    x = _bits(rng, list(range(4, 13)))
    return {"input": _join(x), "output": "odd" if sum(x) % 2 else "even"}


def _majority(rng: random.Random) -> Row:
    x = _bits(rng, [5, 7, 9, 11, 13])
    return {"input": _join(x), "output": "1" if 2 * sum(x) > len(x) else "0"}


GENERATORS: dict[str, Callable[[random.Random], Row]] = {
    "copy": _copy, "reverse": _reverse, "sort": _sort, "addition": _addition,
    "parity": _parity, "majority": _majority,
}



def generate(task: str, n: int, seed: int) -> list[Row]:
    """``n`` examples of ``task`` with distinct inputs, deterministic given ``seed``."""
    if task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(GENERATORS)}")
    rng = random.Random(f"{seed}-{task}")  # a str seed is hashed deterministically (SHA-512)
    rows, seen = [], set()
    for _ in range(100 * n):  # bounded: a too-small input space fails instead of looping
        row = GENERATORS[task](rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ValueError(f"task {task!r} has fewer than {n} distinct inputs")


def build(seed: int = 0, train: int = 2000, eval: int = 200,
          out: Path = DATA_DIR) -> dict[str, dict[str, int]]:
    """Write every synthetic task's train / validation / test files under ``out/synthetic``."""
    sizes = {"train": train, "validation": eval, "test": eval}
    return {task: write_task("synthetic", task, INSTRUCTIONS[task],
                             generate(task, sum(sizes.values()), seed), sizes, seed, out)
            for task in GENERATORS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="defines every example")
    parser.add_argument("--train", type=int, default=2000, help="training examples per task")
    parser.add_argument("--eval", type=int, default=200, help="validation and test examples")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="data directory")
    args = parser.parse_args(argv)
    for task, counts in build(args.seed, args.train, args.eval, args.out).items():
        print(task, counts)


if __name__ == "__main__":
    main()
