"""Self-supervised noising objectives for pretraining an encoder-decoder on raw text.

- :func:`span_corruption`: T5's objective (Raffel et al. 2020, section 3.1.4): about 15 % of
  the tokens, in spans of mean length 3, are dropped from the input; each span leaves one
  sentinel behind, and the target lists the spans, each after its sentinel.
- :func:`text_infilling`: BART's objective (Lewis et al. 2020, section 2.2): spans with
  Poisson(3) lengths are replaced by ONE mask token each (a 0-length span inserts a mask), and
  the target is the whole original text.

Both take a ``numpy.random.Generator`` so that a pretraining run is reproducible from its seed,
and both return ``(inputs, targets)`` without eos: the collator appends it.

The mask of :func:`random_spans_noise_mask` is drawn like T5's reference (``t5/data/
preprocessors.py``): the counts are fixed by the length, the spans alternate non-noise / noise
starting with non-noise, and every mask with those counts is equally likely. The generator is
consumed in a fixed order (the noise-span lengths, then the non-noise-span lengths, one
permutation each), which ``tests/core/data/test_noising.py`` relies on to compare this module
with a transcription of the reference on fixed seeds.
"""
from __future__ import annotations

from itertools import groupby
from typing import Callable, Sequence

import numpy as np


def _positive_parts(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A random composition of ``total`` into ``parts`` positive integers, all equally likely.

    Of the ``total - 1`` gaps between consecutive items, ``parts - 1`` chosen at random start a
    new part: the gaps whose rank in a random permutation is below ``parts - 1``.
    """
    rank = rng.permutation(total - 1)
    starts = np.flatnonzero(rank < parts - 1) + 1          # first item of parts 2, 3, ...
    return np.diff(np.concatenate([[0], starts, [total]]))


def random_spans_noise_mask(length: int, rng: np.random.Generator, *,
                            noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """Which of ``length`` tokens are noise: a ``(length,)`` boolean array.

    ``round(length * noise_density)`` tokens (at least 1, at most ``length - 1``) are noise, in
    ``round(noise / mean_noise_span_length)`` spans (at least 1). The arithmetic is float32, as
    in T5's TensorFlow code, so that rounding ties (``30 * 0.15 = 4.5``) go the same way. Spans
    alternate non-noise / noise, starting with non-noise, so the sequence ends in noise. Like
    T5, a length below 2 is drawn as length 2 and cut. Where T5 would fail (more noise spans
    than non-noise tokens, at densities above about 0.75) the span count is lowered to fit.
    """
    _check_range("noise_density", noise_density, 0.0, 1.0)
    if not mean_noise_span_length >= 1:
        raise ValueError(f"mean_noise_span_length ({mean_noise_span_length}) must be >= 1")
    if length < 0:
        raise ValueError(f"length ({length}) must be >= 0")
    if noise_density == 0.0:
        return np.zeros(length, dtype=bool)
    drawn = max(length, 2)
    noise = int(np.round(np.float32(drawn) * np.float32(noise_density)))
    noise = min(max(noise, 1), drawn - 1)
    spans = int(np.round(np.float32(noise) / np.float32(mean_noise_span_length)))
    spans = min(max(spans, 1), drawn - noise)
    noise_lengths = _positive_parts(noise, spans, rng)
    clean_lengths = _positive_parts(drawn - noise, spans, rng)
    run_lengths = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.tile([False, True], spans)
    return np.repeat(is_noise, run_lengths)[:length]


def span_corruption(tokens: Sequence[int], rng: np.random.Generator, *,
                    sentinel_ids: Sequence[int], noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tuple[list[int], list[int]]:
    """T5's span corruption of ``tokens``: ``(inputs, targets)``, without eos.

    With noise spans ``N_k`` and the clean spans ``C_k`` before them, T5's layout is
    ``inputs = C_0 s_0 C_1 s_1 ...`` and ``targets = s_0 N_0 s_1 N_1 ...`` with
    ``s_k = sentinel_ids[k]``: in the inputs each noise span becomes the next sentinel, in the
    targets each clean span does. Because the mask ends in noise, the targets normally end with
    noise and carry no trailing sentinel; a sequence without noise (length 1, or
    ``noise_density=0``) gives ``targets = [s_0]``, exactly as T5's code does.

    Raises ``ValueError`` if ``tokens`` already hold a sentinel (the corruption could not be
    undone) or if there are fewer sentinels than spans.
    """
    tokens = [int(t) for t in tokens]
    sentinels = [int(s) for s in sentinel_ids]
    clash = set(sentinels).intersection(tokens)
    if clash:
        at = next(i for i, t in enumerate(tokens) if t in clash)
        raise ValueError(f"span_corruption: token {tokens[at]} at position {at} is a sentinel; "
                         "sentinel ids must not occur in the text")
    mask = random_spans_noise_mask(len(tokens), rng, noise_density=noise_density,
                                   mean_noise_span_length=mean_noise_span_length)
    runs = [(bool(noisy), [t for _, t in run])
            for noisy, run in groupby(zip(mask, tokens), key=lambda pair: pair[0])]
    needed = max(sum(noisy for noisy, _ in runs), sum(not noisy for noisy, _ in runs))
    if needed > len(sentinels):
        raise ValueError(f"span_corruption: {len(tokens)} tokens need {needed} sentinels, "
                         f"sentinel_ids has {len(sentinels)}; train the tokenizer with more")
    return _replace_runs(runs, sentinels, replaced=True), _replace_runs(runs, sentinels,
                                                                        replaced=False)


def _replace_runs(runs: list[tuple[bool, list[int]]], sentinels: list[int], *,
                  replaced: bool) -> list[int]:
    """Each run whose noise flag equals ``replaced`` becomes the next sentinel; others stay."""
    out: list[int] = []
    k = 0
    for noisy, run in runs:
        if noisy == replaced:
            out.append(sentinels[k])
            k += 1
        else:
            out.extend(run)
    return out


def reconstruct(inputs: Sequence[int], targets: Sequence[int],
                sentinel_ids: Sequence[int]) -> list[int]:
    """The original tokens of a :func:`span_corruption` pair: every sentinel of the inputs
    replaced by what follows the same sentinel in the targets (up to the next sentinel)."""
    sentinels = {int(s) for s in sentinel_ids}
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in map(int, targets):
        if t in sentinels:
            current = spans.setdefault(t, [])
        elif current is None:
            raise ValueError(f"reconstruct: targets start with {t}, not with a sentinel")
        else:
            current.append(t)
    out: list[int] = []
    for t in map(int, inputs):
        if t not in sentinels:
            out.append(t)
        elif t in spans:
            out.extend(spans[t])
        else:
            raise ValueError(f"reconstruct: sentinel {t} of the inputs is not in the targets")
    return out


def text_infilling(tokens: Sequence[int], rng: np.random.Generator, *, mask_id: int,
                   mask_ratio: float = 0.3,
                   poisson_lambda: float = 3.0) -> tuple[list[int], list[int]]:
    """BART's text infilling of ``tokens``: ``(inputs, targets)``, without eos.

    ``round(len(tokens) * mask_ratio)`` tokens are masked, in spans whose lengths are drawn from
    Poisson(``poisson_lambda``) until they reach that budget (the last one is cut to fit). A
    span of length 0 inserts a mask token between two kept tokens, which teaches the model to
    tell how many tokens a mask hides (Lewis et al. 2020, section 2.2). Spans are placed in
    distinct random gaps between the kept tokens, so no two merge; if there are more spans than
    gaps, the surplus lengths join the last span. The targets are the original tokens.
    """
    _check_range("mask_ratio", mask_ratio, 0.0, 1.0)
    if not poisson_lambda > 0:
        raise ValueError(f"poisson_lambda ({poisson_lambda}) must be > 0")
    tokens = [int(t) for t in tokens]
    budget = int(round(len(tokens) * mask_ratio))
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(int(rng.poisson(poisson_lambda)))
    if lengths:
        lengths[-1] -= sum(lengths) - budget
    kept = len(tokens) - budget
    if len(lengths) > kept + 1:                     # one span per gap at most
        lengths = lengths[:kept] + [sum(lengths[kept:])]
    gaps = rng.choice(kept + 1, size=len(lengths), replace=False)
    span_at = dict(zip(gaps.tolist(), lengths))     # gap g: before the g-th kept token
    inputs: list[int] = []
    position = 0
    for gap in range(kept + 1):
        if gap in span_at:
            inputs.append(mask_id)
            position += span_at[gap]
        if gap < kept:
            inputs.append(tokens[position])
            position += 1
    return inputs, list(tokens)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} ({value}) must be in [{low}, {high}]")


NOISERS: dict[str, Callable[..., tuple[list[int], list[int]]]] = {
    "span_corruption": span_corruption,
    "text_infilling": text_infilling,
}
