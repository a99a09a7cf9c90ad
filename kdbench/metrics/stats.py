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


# ----------------------------------------------------------------------------------------------
# Paired comparisons (two settings evaluated on the same prompts with the same sampling seeds)
# ----------------------------------------------------------------------------------------------
#
# Notation. A *stratum* is one task. Its paired differences are an array ``d[s, p, k]``:
# s = training seed (paired by value between the two settings), p = prompt, k = sampling seed;
# ``d = score_A - score_B`` of the same (training seed, prompt, sampling seed), NaN where either
# side has no score. A 2-D array ``[p, k]`` (or 1-D ``[p]``) is one training seed.
#
# Point estimate (the mean difference), with ``dbar[s, p]`` = mean over the available k:
#
#     m_s   = mean over the prompts p with a value of dbar[s, p]          (per training seed)
#     est_t = mean over the training seeds s with a value of m_s           (per stratum / task)
#     est   = mean over strata of est_t                                    (several tasks: equal weights)
#
# which, without missing cells, is the plain mean of all d (per task), as the leaderboard's
# "mean over sampling seeds, then over training seeds" is of the per-seed metric values.
#
# Paired bootstrap (B replicates, ``numpy.random.default_rng(seed)``), in this order of draws:
#   1. per stratum t: draw P_t prompts with replacement (multiplicities w_t[p]); a prompt keeps all
#      its cells (every training seed and sampling seed) together;
#   2. when S > 1: draw S training seeds with replacement (multiplicities v[s]), shared by all
#      strata (a training seed is one trained model for every task).
#   The prompt draw of a replicate is applied to every drawn training seed: the prompts are the
#   *same* prompts for every seed (a crossed design, not a nested one), so a prompt's difficulty
#   counts once, as in the data. Replicate:
#       m*_s   = sum_p w_t[p] C[s,p] dbar[s,p] / sum_p w_t[p] C[s,p]       (C: 1 where dbar exists)
#       est*_t = sum_s v[s] m*_s / sum_s v[s]      (seeds whose m*_s is undefined left out)
#       est*   = mean over strata of est*_t
# 95 % CI: the 2.5 and 97.5 percentiles of est*. Two-sided p (bootstrap sign test, percentile
# inversion): p = min(1, 2 * (min(#{est* <= 0}, #{est* >= 0}) + 1) / (B + 1)); the smallest
# reportable p is 2/(B+1). ``separated`` is ``p < alpha``. The test is undefined (NaN) when a stratum
# has fewer than 2 prompts (nothing to resample).

Z_975 = 1.959963984540054  # the 0.975 quantile of the standard normal


def _strata(diffs) -> list[np.ndarray]:
    """One array or a list/tuple of arrays (one per stratum) -> list of float [S, P, K] arrays."""
    parts = list(diffs) if isinstance(diffs, (list, tuple)) and diffs and isinstance(diffs[0], np.ndarray) else [diffs]
    out = []
    for a in parts:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim == 1:
            a = a[None, :, None]
        elif a.ndim == 2:
            a = a[None]
        if a.ndim != 3:
            raise ValueError(f"paired differences must be [prompts], [prompts, seeds] or [train, prompts, seeds], "
                             f"got shape {a.shape}")
        out.append(a)
    s = {a.shape[0] for a in out}
    if len(s) != 1:
        raise ValueError(f"every stratum needs the same training-seed axis, got sizes {sorted(s)}")
    return out


def _cells(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[S, P, K] -> (dbar [S, P'] with NaN -> 0, C [S, P'] 0/1), prompts without any value dropped."""
    ok = ~np.isnan(a)
    n = ok.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        dbar = np.where(ok, a, 0.0).sum(axis=2) / n
    keep = (n > 0).any(axis=0)
    c = (n > 0)[:, keep].astype(np.float64)
    return np.where(c > 0, dbar[:, keep], 0.0), c


def _estimate(dbar: np.ndarray, c: np.ndarray) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (dbar * c).sum(axis=1) / c.sum(axis=1)
    m = m[~np.isnan(m)]
    return float(m.mean()) if m.size else math.nan


def _counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """Bootstrap multiplicities [n_boot, n] of n units drawn with replacement."""
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def paired_replicates(diffs, n_boot: int = 2000, seed: int = 0) -> dict:
    """The paired bootstrap's ingredients: ``estimate``, ``replicates`` (array of ``n_boot``, NaN where a
    replicate is undefined), ``n_prompts`` (summed over strata), ``n_train_seeds`` (seeds with a value),
    ``n_cells`` (aligned (seed, prompt, sampling seed) cells), ``min_prompts`` (smallest stratum).
    See the comment block above for the definitions; the draws depend only on the shapes (prompts
    with a value per stratum, training seeds), so two calls with equal shapes and seed draw alike."""
    strata = _strata(diffs)
    cells = [_cells(a) for a in strata]
    n_cells = int(sum((~np.isnan(a)).sum() for a in strata))
    seeds_with_value = np.zeros(strata[0].shape[0], dtype=bool)
    for _, c in cells:
        seeds_with_value |= c.sum(axis=1) > 0
    ests = [_estimate(d, c) for d, c in cells]
    estimate = float(np.mean(ests)) if ests and not any(math.isnan(e) for e in ests) else math.nan
    n_prompts = [c.shape[1] for _, c in cells]
    out = dict(estimate=estimate, replicates=np.full(n_boot, math.nan), n_prompts=int(sum(n_prompts)),
               n_train_seeds=int(seeds_with_value.sum()), n_cells=n_cells, min_prompts=min(n_prompts))
    if math.isnan(estimate) or min(n_prompts) < 2:
        return out
    rng = np.random.default_rng(seed)
    w = [_counts(rng, c.shape[1], n_boot) for _, c in cells]  # 1. prompts, per stratum
    s = strata[0].shape[0]
    v = _counts(rng, s, n_boot) if s > 1 else np.ones((n_boot, 1))  # 2. training seeds
    reps = np.zeros(n_boot)
    for (d, c), wt in zip(cells, w):
        with np.errstate(invalid="ignore", divide="ignore"):
            m = (wt @ (d * c).T) / (wt @ c.T)  # [B, S]
            ok = ~np.isnan(m)
            reps += np.where(ok, v * np.nan_to_num(m), 0.0).sum(axis=1) / (v * ok).sum(axis=1)
    out["replicates"] = reps / len(cells)
    return out


def bootstrap_p(replicates, null: float = 0.0) -> float:
    """Two-sided bootstrap p of ``estimate == null`` by percentile inversion (the bootstrap sign test):
    ``min(1, 2 (min(#{r <= null}, #{r >= null}) + 1) / (B + 1))`` over the B finite replicates; NaN
    without any."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return math.nan
    low, high = int((r <= null).sum()), int((r >= null).sum())
    return float(min(1.0, 2.0 * (min(low, high) + 1) / (r.size + 1)))


def paired_bootstrap(diffs, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Paired (two-level when several training seeds) bootstrap of the mean of paired differences.

    ``diffs``: ``[prompts]``, ``[prompts, sampling seeds]``, ``[training seeds, prompts, sampling seeds]``
    (NaN = missing cell), or a list of such arrays with one shared training-seed axis (one per task; the
    estimate is the mean of the per-task estimates). Returns a dict: ``mean`` (point estimate), ``lo``,
    ``hi`` (percentile CI at level 1 - alpha), ``p`` (:func:`bootstrap_p`), ``se`` (sample std of the
    replicates, ddof=1), ``separated`` (p < alpha), ``n_prompts``, ``n_train_seeds``, ``n_cells``,
    ``n_boot``. Everything but the counts and ``mean`` is NaN (``separated`` False) when the test is
    undefined: a stratum with fewer than two prompts. Definitions: the comment block above."""
    r = paired_replicates(diffs, n_boot=n_boot, seed=seed)
    reps = r["replicates"][~np.isnan(r["replicates"])]
    out = dict(mean=r["estimate"], lo=math.nan, hi=math.nan, p=math.nan, se=math.nan, separated=False,
               n_prompts=r["n_prompts"], n_train_seeds=r["n_train_seeds"], n_cells=r["n_cells"], n_boot=int(n_boot))
    if reps.size < 2:
        return out
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    p = bootstrap_p(reps)
    out.update(lo=float(lo), hi=float(hi), p=p, se=float(reps.std(ddof=1)), separated=bool(p < alpha))
    return out


def paired_ratio_bootstrap(num, den, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                           scale: float = 1.0) -> dict:
    """``scale · est(num) / est(den)`` of two paired-difference arrays on the same cells (e.g. the share
    of the teacher - undistilled band a setting recovers: num = A - U, den = T - U), with a percentile
    CI from the *same* bootstrap draws for numerator and denominator (cells missing on either side are
    dropped from both). Returns ``mean``, ``lo``, ``hi``, ``n_prompts``, ``n_train_seeds``, ``n_boot``."""
    sn, sd = _strata(num), _strata(den)
    if [a.shape for a in sn] != [a.shape for a in sd]:
        raise ValueError("numerator and denominator must have the same shapes")
    both = [np.where(np.isnan(a) | np.isnan(b), np.nan, a) for a, b in zip(sn, sd)]
    sd = [np.where(np.isnan(x), np.nan, b) for x, b in zip(both, sd)]
    rn = paired_replicates(both, n_boot=n_boot, seed=seed)
    rd = paired_replicates(sd, n_boot=n_boot, seed=seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        est = scale * rn["estimate"] / rd["estimate"] if rd["estimate"] else math.nan
        reps = scale * rn["replicates"] / rd["replicates"]
    reps = reps[np.isfinite(reps)]
    out = dict(mean=float(est), lo=math.nan, hi=math.nan, n_prompts=rn["n_prompts"],
               n_train_seeds=rn["n_train_seeds"], n_boot=int(n_boot))
    if reps.size >= 2 and math.isfinite(est):
        lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
        out.update(lo=float(lo), hi=float(hi))
    return out


def paired_normal_se(diffs) -> float:
    """Closed-form (normal-approximation) standard error of the paired mean for ONE training seed:
    per stratum ``SE_t = sd_p(dbar[p]) / sqrt(P_t)`` (sample std, ddof=1, of the per-prompt means over
    sampling seeds), combined as ``sqrt(sum_t SE_t^2) / T`` for the mean of T strata. The paired
    bootstrap's ``se`` converges to ``sqrt((P-1)/P)`` times this (the plug-in variance). NaN for several
    training seeds or a stratum with fewer than two prompts."""
    strata = _strata(diffs)
    if strata[0].shape[0] != 1:
        return math.nan
    var = 0.0
    for a in strata:
        dbar, c = _cells(a)
        x = dbar[0][c[0] > 0]
        if x.size < 2:
            return math.nan
        var += float(x.var(ddof=1)) / x.size
    return math.sqrt(var) / len(strata)


def resolution(ses, alpha: float = 0.05) -> float:
    """The smallest difference a suite can resolve: ``z(1 - alpha/2) · sqrt(mean(se_i^2))`` over the finite
    standard errors ``se_i`` of the paired differences of the pairs of settings present (root-mean-square
    pooling = the pooled variance). A true difference of this size is separated about half the time
    (p < alpha at 50 % power); ~1.43× it is separated 80 % of the time. NaN without any finite se."""
    from statistics import NormalDist

    s = np.asarray(list(ses), dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return math.nan
    z = Z_975 if alpha == 0.05 else NormalDist().inv_cdf(1 - alpha / 2)
    return float(z * math.sqrt(float(np.mean(s * s))))
