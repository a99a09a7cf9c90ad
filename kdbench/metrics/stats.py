"""Uncertainty: seed-aware prompt bootstrap, mean +- sample std, Student-t interval.

Part of :mod:`kdbench.metrics` (import from there).
"""

from __future__ import annotations

import math

import numpy as np


# ----------------------------------------------------------------------------------------------
# Uncertainty
# ----------------------------------------------------------------------------------------------


def bootstrap_ci(scores, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Seed-aware percentile bootstrap over prompts: ``(mean, lo, hi)``.

    ``scores`` is ``[prompts, seeds]`` (a 1-D array is one seed). The statistic is the mean over
    all non-NaN cells. Each of ``n_boot`` replicates draws prompts with replacement
    (``numpy.random.default_rng(seed)``), keeping each prompt's seeds together, and takes the
    mean over all non-NaN cells of the drawn rows; ``lo``/``hi`` are the ``alpha/2`` and
    ``1 - alpha/2`` percentiles of the replicates. NaN cells are missing values; rows with no
    value are dropped. The interval covers prompt sampling (and the seeds within a prompt), not
    training-run variance (see :func:`t_interval`). All-NaN / empty input gives ``(nan, nan, nan)``;
    a single prompt gives a zero-width interval.
    """
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"scores must be [prompts, seeds], got shape {a.shape}")
    ok = ~np.isnan(a)
    row_n = ok.sum(axis=1)
    keep = row_n > 0
    if not keep.any():
        return float("nan"), float("nan"), float("nan")
    row_sum = np.where(ok, a, 0.0).sum(axis=1)[keep]
    row_n = row_n[keep]
    mean = float(row_sum.sum() / row_n.sum())
    p = row_sum.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, p, size=(n_boot, p))
    boots = row_sum[idx].sum(axis=1) / row_n[idx].sum(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def mean_std(values) -> tuple[float, float]:
    """``(mean, sample std with ddof=1)`` of the non-NaN values; std 0.0 for one value, ``(nan, nan)`` for none."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(ddof=1))


def t_interval(values, alpha: float = 0.05) -> tuple[float, float, float]:
    """Student-t confidence interval for the mean of independent runs (e.g. training seeds).

    ``(mean, lo, hi)`` with half-width ``t_{1-alpha/2, n-1} * s / sqrt(n)`` (s: sample std,
    ddof=1) over the non-NaN values. For n = 1 the interval is undefined and **lo = hi = nan**
    (mean still returned); for n = 0 everything is nan.
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = v.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if n == 1:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(1 - alpha / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half
