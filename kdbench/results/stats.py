"""The statistics of the leaderboard protocol (see :mod:`kdbench.results`): metric direction, Student-t
intervals and Welch's test from summary statistics (scipy.stats), and the pooling of per-run rows.

Every function here works on summary statistics (mean, std, n) because the database aggregates the
per-seed values; :func:`kdbench.metrics.t_interval` is the same interval on raw values.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats as _stats

# Metrics where a smaller number is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"self_bleu", "self_bleu_across_seeds", "degenerate_frac", "fkl_tok", "rkl_tok"})
AVERAGE = "average"  # the pseudo-task name of the across-task average column
CONFIDENCE = 0.95
ALPHA = 0.05


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def stat_col(task: str, stat: str = "mean") -> str:
    """Column name of a statistic in :func:`leaderboard`'s wide table: the mean is the bare task name,
    the others are ``"<task> <stat>"`` with stat in ci95 (half-width), ci_lo, ci_hi, std, n."""
    return task if stat == "mean" else f"{task} {stat}"


def t_quantile(q: float, df: float) -> float:
    """The q-quantile (q in (0.5, 1)) of Student's t with ``df`` (real, > 0) degrees of freedom; NaN outside."""
    if not df > 0 or not 0.5 < q < 1.0:
        return math.nan
    return float(_stats.t.ppf(q, df))


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isnan(t) or not df > 0:
        return math.nan
    return float(2.0 * _stats.t.sf(abs(t), df))


def ci_half(std: float, n: float, confidence: float = CONFIDENCE) -> float:
    """Half-width of the Student-t interval of a mean: ``t(0.5 + c/2, n-1) · std / sqrt(n)``; NaN for n < 2."""
    if n is None or n < 2 or std is None or math.isnan(std):
        return math.nan
    return t_quantile(0.5 + confidence / 2.0, float(n - 1)) * std / math.sqrt(n)


def welch(m1: float, s1: float, n1: float, m2: float, s2: float, n2: float,
          confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Welch's t-test from summary statistics (std with ddof=1): (two-sided p, CI half-width of m1 - m2,
    Welch–Satterthwaite df).

    NaN p and half-width when a side has n < 2 (its variance is unknown). With zero variance on both
    sides the means either agree exactly (p = 1) or differ with certainty (p = 0)."""
    if not (n1 >= 2 and n2 >= 2) or any(math.isnan(v) for v in (m1, s1, m2, s2)):
        return math.nan, math.nan, math.nan
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se2 = v1 + v2
    if se2 == 0.0:
        return (1.0 if m1 == m2 else 0.0), 0.0, float(n1 + n2 - 2)
    df = se2 * se2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    p = float(_stats.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False).pvalue)
    return p, t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(se2), df


STAT_COLUMNS = ["grp", "role", "key", "mean", "ci95", "ci_lo", "ci_hi", "std", "n", "n_runs"]


def pool(per_run: pd.DataFrame) -> pd.DataFrame:
    """Pool per-run rows (grp, role, run_id, key, rn, rmean, ss: count, mean and sum of squared deviations
    of the run's per-seed values) into one row per (grp, role, key): mean (of run means), std and n over
    all per-seed values, the CI and n_runs (columns :data:`STAT_COLUMNS`)."""
    if per_run.empty:
        return pd.DataFrame(columns=STAT_COLUMNS)
    per_run = per_run.astype({"rn": "int64", "rmean": "float64", "ss": "float64"})
    out = []
    for (grp, role, key), g in per_run.groupby(["grp", "role", "key"], sort=False):
        n = int(g.rn.sum())
        vmean = float((g.rn * g.rmean).sum() / n)
        ss = float(g.ss.sum() + (g.rn * (g.rmean - vmean) ** 2).sum())
        std = math.sqrt(max(ss, 0.0) / (n - 1)) if n > 1 else math.nan
        mean = float(g.rmean.mean())
        half = ci_half(std, n)
        out.append((grp, role, key, mean, half, mean - half, mean + half, std, n, int(len(g))))
    return pd.DataFrame(out, columns=STAT_COLUMNS)
