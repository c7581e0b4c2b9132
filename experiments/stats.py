"""The statistics of an ablation table: confidence intervals, Δm, significance tests.

Pure functions over plain lists of numbers (one number per seed, or per test example), so each
one can be checked against scipy on hand-made data; ``table.py`` turns them into tables.

- :func:`ci_half_width`: the 95% confidence interval of a mean over seeds from Student's t
  distribution with ``n - 1`` degrees of freedom (few seeds: the normal 1.96 would be too
  narrow; with 3 seeds t is 4.30).
- :func:`delta_m`: the multi-task gain Δm of Maninis, Radosavovic & Kokkinos, *Attentive
  Single-Tasking of Multiple Tasks*, CVPR 2019 (as LibMTL reports it): the mean over tasks of
  the signed relative change, in percent, against a baseline; the sign flips for a metric where
  lower is better (:data:`LOWER_IS_BETTER`).
- :func:`welch_p`: Welch's t-test over seeds (unequal variances; Dror et al., ACL 2018,
  recommend it over Student's when the spreads differ).
- :func:`paired_bootstrap_p`: with one seed there is no spread over seeds, but each test example
  is a paired observation (both settings scored it): resample examples with replacement
  (Koehn, EMNLP 2004; Berg-Kirkpatrick et al., EMNLP 2012).
"""
from __future__ import annotations

import math
import warnings
from statistics import mean, stdev
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

from polytask.core.metrics import METRICS

#: Metrics where a smaller value is the better one. Every metric polytask computes today
#: (``core.metrics.METRICS``) is higher-better, 0-100; a lower-better metric (an error rate,
#: a perplexity) added to ``METRICS`` must be added here too, or Δm and the bold best point the
#: wrong way.
LOWER_IS_BETTER: frozenset[str] = frozenset({"ter", "wer", "cer", "perplexity", "loss"})
#: the averages written next to the task metrics (means of higher-better metrics)
AVERAGE_METRICS: frozenset[str] = frozenset({"average", "average_seen", "average_held_out"})

LEVEL = 0.95      # confidence level of the intervals
ALPHA = 0.05      # significance level of the marks


def is_known(metric: str) -> bool:
    """Whether the direction of ``metric`` is known (the report names the others)."""
    return metric in METRICS or metric in LOWER_IS_BETTER or metric in AVERAGE_METRICS


def lower_is_better(metric: str) -> bool:
    """True for a metric in :data:`LOWER_IS_BETTER`; every other metric counts as higher-better
    (:func:`is_known` tells whether that is an assumption)."""
    return metric in LOWER_IS_BETTER


def mean_ci(values: Sequence[float], level: float = LEVEL) -> tuple[float, float | None]:
    """(mean, half-width of its ``level`` confidence interval); the half-width is None for one
    value, since one seed says nothing about the spread."""
    if not values:
        raise ValueError("mean_ci needs at least one value, got none")
    return mean(values), ci_half_width(values, level)


def ci_half_width(values: Sequence[float], level: float = LEVEL) -> float | None:
    """``t_{(1+level)/2, n-1} · s / √n``, ``s`` the sample std (``ddof=1``); None if n < 2."""
    n = len(values)
    if n < 2:
        return None
    return float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) * stdev(values) / math.sqrt(n)


def delta_m(means: Sequence[float], baseline: Sequence[float],
            lower_better: Sequence[bool]) -> float | None:
    """Δm = 100/T Σ_t (-1)^{l_t} (M_t - B_t) / B_t over T tasks, ``l_t`` = ``lower_better[t]``.
    None when there is no task or a baseline value is 0 (the relative change is undefined)."""
    if not (len(means) == len(baseline) == len(lower_better)):
        raise ValueError(f"delta_m: {len(means)} means, {len(baseline)} baseline values and "
                         f"{len(lower_better)} directions; expected one of each per task")
    if not means or any(b == 0 for b in baseline):
        return None
    return 100.0 / len(means) * sum((-1 if low else 1) * (m - b) / b
                                    for m, b, low in zip(means, baseline, lower_better))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``); None
    when a side has fewer than two values or both have no spread (the test is undefined)."""
    if len(a) < 2 or len(b) < 2 or (stdev(a) == 0 and stdev(b) == 0):
        return None
    with warnings.catch_warnings():    # one side without spread: scipy warns, the test holds
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_bootstrap_p(a: Sequence[float], b: Sequence[float], resamples: int = 10_000,
                       seed: int = 0) -> float | None:
    """Two-sided p-value that the mean per-example scores ``a`` and ``b`` (the same examples,
    in the same order) differ: resample the examples ``resamples`` times; under the null the
    resampled difference, shifted by the observed one, is as large as the observed one
    (Berg-Kirkpatrick et al. 2012). None without examples or ``resamples < 1``."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap_p: {len(a)} and {len(b)} scores; a paired test "
                         "needs the same examples on both sides")
    if not len(a) or resamples < 1:
        return None
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    observed = diff.mean()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    boot = diff[idx].mean(axis=1)                                      # (resamples,)
    # the null distribution is boot - observed; count those at least as extreme (+1 smoothing)
    extreme = np.sum(np.abs(boot - observed) >= abs(observed) - 1e-12)
    return float((extreme + 1) / (resamples + 1))


def significant(p: float | None, alpha: float = ALPHA) -> bool:
    return p is not None and p < alpha
