"""Query and aggregation layer over the run store, shared by the leaderboard app and the CLI.

Pure functions: a SQLAlchemy engine in, pandas DataFrames (or plain lists / dicts) out. Nothing
here writes. Aggregates run in the database (``GROUP BY`` over ``metrics`` / ``samples``); pandas
only combines the already-aggregated per-run rows (one row per run and task), never the samples.

Statistics (the leaderboard protocol)
-------------------------------------
* Only ``status = 'finished'`` runs count. Failed runs are listed by :func:`failed_runs`.
* A leaderboard row is a *setting* (``runs.setting``, one objective with its parameters) of the
  ``distilled`` role, or a reference row: ``teacher`` and ``student-init`` (labelled by role).
* Per task, the reported **mean** is the mean over the run's sampling seeds first (one number
  per training-seed run), then the mean of those over the setting's runs.
* The **95 % CI** is a Student-t interval over *all* per-seed values of the setting
  (every training-seed run × sampling seed): ``mean ± t(0.975, n-1) · std / sqrt(n)``, with
  ``n`` the number of per-seed values and ``std`` their sample standard deviation (ddof=1). It
  treats sampling seeds as independent draws, so it mixes training- and sampling-seed noise;
  with a single value (``n = 1``) ``std`` and the CI are NaN.
* The **average** column averages each (run, sampling seed) over the selected tasks first
  (only (run, seed) pairs that have every selected task), then applies the same statistics.
* **rank** orders the distilled settings by the average (or by the single task) with the
  metric's direction (:data:`LOWER_IS_BETTER`); reference rows are not ranked.
* **tied_with_best**: Welch's unequal-variance t-test of the row against the best row, on the
  same per-seed values (mean, std, n as above); True where it cannot reject equality at
  ``ALPHA = 0.05`` (p >= 0.05), and for the best row itself. Where the test is undefined
  (n < 2 on either side) the row counts as tied: the data cannot tell them apart.

The t distribution is computed here (regularised incomplete beta), so scipy is not needed.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any, Iterable, Sequence

import pandas as pd
from sqlalchemy import and_, case, func, inspect, literal, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from kdbench.store import (
    ROLE_ANALYSIS,
    ROLE_DISTILLED,
    ROLE_STUDENT_INIT,
    ROLE_TEACHER,
    Artifact,
    CurvePoint,
    Metric,
    Run,
    Sample,
)

__all__ = [
    "LOWER_IS_BETTER", "REFERENCE_ROLES", "AVERAGE", "CONFIDENCE", "ALPHA",
    "lower_is_better", "stat_col", "t_quantile", "t_two_sided_p", "welch",
    "store_state", "store_fingerprint", "list_suites", "default_version", "list_tasks", "list_metrics",
    "list_settings", "list_runs", "failed_runs", "status_counts",
    "leaderboard_long", "leaderboard", "run_summary", "run_detail", "run_metrics", "teacher_run_for",
    "curves", "samples", "count_samples", "sample_seeds", "sample_tasks", "score_names",
    "compare", "prompts_differing_most",
    "fidelity_diversity", "grad_similarity", "grad_similarity_long", "to_markdown",
]

# Metrics where a smaller number is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"self_bleu", "degenerate_frac", "fkl_tok", "rkl_tok"})
REFERENCE_ROLES = (ROLE_TEACHER, ROLE_STUDENT_INIT)
LEADERBOARD_ROLES = (*REFERENCE_ROLES, ROLE_DISTILLED)
AVERAGE = "average"  # the pseudo-task name of the across-task average column
CONFIDENCE = 0.95
ALPHA = 0.05
FINISHED = "finished"
FAILED = "failed"
# Headline metrics listed first in selectors; every metric found in the store is listed.
_PREFERRED_METRICS = ("rougeL", "accuracy")
COST_COLUMNS = ("wall_time_s", "train_tokens_per_s", "peak_memory_mb")
_RUN_SELECTOR = re.compile(r"^run:(\d+)$")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def stat_col(task: str, stat: str = "mean") -> str:
    """Column name of a statistic in :func:`leaderboard`'s wide table: the mean is the bare task name,
    the others are ``"<task> <stat>"`` with stat in ci95 (half-width), ci_lo, ci_hi, std, n."""
    return task if stat == "mean" else f"{task} {stat}"


# ---------------------------------------------------------------------------- t distribution


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    bt = math.exp(lbt)
    if x < (a + 1.0) / (a + b + 2.0):
        return bt * _betacf(a, b, x) / a
    return 1.0 - bt * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if math.isnan(t) or not df > 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


@lru_cache(maxsize=4096)
def t_quantile(q: float, df: float) -> float:
    """The q-quantile (q in (0.5, 1)) of Student's t with ``df`` degrees of freedom (bisection)."""
    if not df > 0 or not 0.5 < q < 1.0:
        return math.nan
    target = 2.0 * (1.0 - q)  # two-sided tail probability
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _ci_half(std: float, n: float, confidence: float = CONFIDENCE) -> float:
    if n is None or n < 2 or std is None or math.isnan(std):
        return math.nan
    return t_quantile(0.5 + confidence / 2.0, float(n - 1)) * std / math.sqrt(n)


def welch(m1: float, s1: float, n1: float, m2: float, s2: float, n2: float,
          confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Welch's t-test from summary statistics: (two-sided p, CI half-width of m1 - m2, df).

    NaN p and half-width when a side has n < 2 (its variance is unknown)."""
    if not (n1 >= 2 and n2 >= 2) or any(math.isnan(v) for v in (m1, s1, m2, s2)):
        return math.nan, math.nan, math.nan
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se2 = v1 + v2
    if se2 == 0.0:
        return (1.0 if m1 == m2 else 0.0), 0.0, float(n1 + n2 - 2)
    df = se2 * se2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    se = math.sqrt(se2)
    p = t_two_sided_p((m1 - m2) / se, df)
    return p, t_quantile(0.5 + confidence / 2.0, df) * se, df


# ---------------------------------------------------------------------------- store state


def _has_runs_table(engine: Engine) -> bool:
    try:
        return inspect(engine).has_table("runs")
    except Exception:
        return False


def store_state(engine: Engine) -> str:
    """'no_schema' (no kdbench tables), 'empty' (no runs), 'no_finished' (runs, none finished) or 'ok'."""
    if not _has_runs_table(engine):
        return "no_schema"
    with engine.connect() as c:
        n, n_fin = c.execute(select(func.count(Run.id), func.count(case((Run.status == FINISHED, 1))))).one()
    if not n:
        return "empty"
    return "ok" if n_fin else "no_finished"


def store_fingerprint(engine: Engine) -> tuple | None:
    """A cheap value that changes whenever the store gains or finishes anything (for caches)."""
    if not _has_runs_table(engine):
        return None
    with engine.connect() as c:
        runs = c.execute(select(func.max(Run.id), func.count(Run.id),
                                func.count(case((Run.status == FINISHED, 1))),
                                func.count(case((Run.status == FAILED, 1))),
                                func.max(Run.finished_at))).one()
        rest = tuple(c.execute(select(func.max(t.id))).scalar() for t in (Metric, Sample, CurvePoint, Artifact))
    return tuple(str(v) if v is not None and not isinstance(v, (int, float)) else v for v in (*runs, *rest))


def _frame(engine: Engine, stmt, columns: Sequence[str] | None = None) -> pd.DataFrame:
    with engine.connect() as c:
        res = c.execute(stmt)
        rows = res.fetchall()
        cols = list(columns) if columns is not None else list(res.keys())
    return pd.DataFrame([tuple(r) for r in rows], columns=cols)


# ---------------------------------------------------------------------------- catalogue queries


def list_suites(engine: Engine) -> pd.DataFrame:
    """One row per (suite, suite_version) with run counts; newest activity first within a suite."""
    stmt = (select(Run.suite, Run.suite_version,
                   func.count(case((Run.status == FINISHED, 1))).label("n_finished"),
                   func.count(case((Run.status == FAILED, 1))).label("n_failed"),
                   func.count(case((Run.status == "running", 1))).label("n_running"),
                   func.max(Run.id).label("last_run_id"))
            .group_by(Run.suite, Run.suite_version)
            .order_by(Run.suite, func.max(Run.id).desc()))
    return _frame(engine, stmt)


def default_version(engine: Engine, suite: str) -> str | None:
    """The suite_version of the suite's most recent finished run (else of its most recent run)."""
    with engine.connect() as c:
        for cond in (Run.status == FINISHED, literal(True)):
            v = c.execute(select(Run.suite_version).where(Run.suite == suite, cond)
                          .order_by(Run.id.desc()).limit(1)).scalar()
            if v is not None:
                return v
    return None


def _version(engine: Engine, suite: str, suite_version: str | None) -> str | None:
    return suite_version if suite_version is not None else default_version(engine, suite)


def _finished(suite: str, version: str | None, roles: Iterable[str] = LEADERBOARD_ROLES):
    return and_(Run.suite == suite, Run.suite_version == version, Run.status == FINISHED, Run.role.in_(list(roles)))


def list_tasks(engine: Engine, suite: str, suite_version: str | None = None, metric: str | None = None) -> list[str]:
    """Tasks with metrics from finished runs of the suite (optionally only those having ``metric``)."""
    version = _version(engine, suite, suite_version)
    stmt = select(Metric.task).join(Run, Run.id == Metric.run_id).where(_finished(suite, version))
    if metric is not None:
        stmt = stmt.where(Metric.metric == metric)
    with engine.connect() as c:
        return list(c.execute(stmt.distinct().order_by(Metric.task)).scalars())


def list_metrics(engine: Engine, suite: str, task: str | None = None, suite_version: str | None = None) -> list[str]:
    """Metric names found in the store for the suite (and task); headline metrics first."""
    version = _version(engine, suite, suite_version)
    stmt = select(Metric.metric).join(Run, Run.id == Metric.run_id).where(_finished(suite, version))
    if task is not None:
        stmt = stmt.where(Metric.task == task)
    with engine.connect() as c:
        names = list(c.execute(stmt.distinct()).scalars())
    return sorted(names, key=lambda m: (_PREFERRED_METRICS.index(m) if m in _PREFERRED_METRICS
                                        else len(_PREFERRED_METRICS), m.lower()))


def _group_label():
    """SQL label of a leaderboard row: the setting for distilled runs, the role for reference rows."""
    return case((Run.role == ROLE_DISTILLED, func.coalesce(Run.setting, Run.objective, "unnamed")),
                else_=Run.role)


def list_settings(engine: Engine, suite: str, suite_version: str | None = None) -> pd.DataFrame:
    """Leaderboard rows available (finished runs): setting label, role, objective, n_runs."""
    version = _version(engine, suite, suite_version)
    g = _group_label().label("setting")
    stmt = (select(g, Run.role, func.min(Run.objective).label("objective"), func.count(Run.id).label("n_runs"))
            .where(_finished(suite, version)).group_by(g, Run.role).order_by(Run.role.desc(), g))
    df = _frame(engine, stmt)
    return _order_rows(df)


def list_runs(engine: Engine, suite: str | None = None, status: str | None = None,
              roles: Iterable[str] | None = None) -> pd.DataFrame:
    """Runs (newest first) for pickers: id, role, setting, objective, suite, version, seed, status, ..."""
    stmt = select(Run.id.label("run_id"), Run.role, Run.setting, Run.objective, Run.suite, Run.suite_version,
                  Run.seed, Run.status, Run.created_at, Run.finished_at, Run.wall_time_s, Run.error)
    if suite is not None:
        stmt = stmt.where(Run.suite == suite)
    if status is not None:
        stmt = stmt.where(Run.status == status)
    if roles is not None:
        stmt = stmt.where(Run.role.in_(list(roles)))
    return _frame(engine, stmt.order_by(Run.id.desc()))


def failed_runs(engine: Engine, suite: str | None = None, suite_version: str | None = None) -> pd.DataFrame:
    """Failed runs with their reasons (newest first)."""
    stmt = select(Run.id.label("run_id"), Run.role, Run.setting, Run.suite, Run.suite_version, Run.seed,
                  Run.error, Run.created_at, Run.finished_at).where(Run.status == FAILED)
    if suite is not None:
        stmt = stmt.where(Run.suite == suite)
    if suite_version is not None:
        stmt = stmt.where(Run.suite_version == suite_version)
    return _frame(engine, stmt.order_by(Run.id.desc()))


def status_counts(engine: Engine, suite: str | None = None, suite_version: str | None = None) -> dict[str, int]:
    stmt = select(Run.status, func.count(Run.id)).group_by(Run.status)
    if suite is not None:
        stmt = stmt.where(Run.suite == suite)
    if suite_version is not None:
        stmt = stmt.where(Run.suite_version == suite_version)
    with engine.connect() as c:
        return {s: int(n) for s, n in c.execute(stmt)}


# ---------------------------------------------------------------------------- core statistics


def _selector_condition(sel: str):
    """A row selector: a setting label, a reference role name, or ``run:<id>`` for one run."""
    m = _RUN_SELECTOR.match(str(sel))
    if m:
        return Run.id == int(m.group(1))
    if sel in REFERENCE_ROLES:
        return Run.role == sel
    return and_(Run.role == ROLE_DISTILLED, func.coalesce(Run.setting, Run.objective, "unnamed") == sel)


def _stats_from_values(engine: Engine, values) -> pd.DataFrame:
    """values: a select with columns (grp, role, run_id, key, value), one row per per-seed value.

    SQL computes per (run, key): n, mean and the sum of squared deviations from the run mean;
    pandas pools those (small) rows per (grp, key) into mean (of run means), std and n over all
    per-seed values, n_runs and the CI."""
    v = values.subquery("v")
    rm = (select(v.c.run_id, v.c.key, func.avg(v.c.value).label("rmean"), func.count().label("rn"))
          .group_by(v.c.run_id, v.c.key).subquery("rm"))
    dev = (v.c.value - rm.c.rmean)
    stmt = (select(v.c.grp, v.c.role, v.c.run_id, v.c.key, rm.c.rn, rm.c.rmean, func.sum(dev * dev).label("ss"))
            .join(rm, and_(rm.c.run_id == v.c.run_id, rm.c.key == v.c.key))
            .group_by(v.c.grp, v.c.role, v.c.run_id, v.c.key, rm.c.rn, rm.c.rmean))
    per_run = _frame(engine, stmt, ["grp", "role", "run_id", "key", "rn", "rmean", "ss"])
    return _pool(per_run)


_STAT_COLUMNS = ["grp", "role", "key", "mean", "ci95", "ci_lo", "ci_hi", "std", "n", "n_runs"]


def _pool(per_run: pd.DataFrame) -> pd.DataFrame:
    if per_run.empty:
        return pd.DataFrame(columns=_STAT_COLUMNS)
    per_run = per_run.astype({"rn": "int64", "rmean": "float64", "ss": "float64"})
    out = []
    for (grp, role, key), g in per_run.groupby(["grp", "role", "key"], sort=False):
        n = int(g.rn.sum())
        vmean = float((g.rn * g.rmean).sum() / n)
        ss = float(g.ss.sum() + (g.rn * (g.rmean - vmean) ** 2).sum())
        std = math.sqrt(max(ss, 0.0) / (n - 1)) if n > 1 else math.nan
        mean = float(g.rmean.mean())
        half = _ci_half(std, n)
        out.append((grp, role, key, mean, half, mean - half, mean + half, std, n, int(len(g))))
    return pd.DataFrame(out, columns=_STAT_COLUMNS)


def _task_values(suite: str, version: str | None, metric: str, tasks: Sequence[str] | None, row_filter=None):
    stmt = (select(_group_label().label("grp"), Run.role, Run.id.label("run_id"), Metric.task.label("key"),
                   Metric.value.label("value"))
            .join(Run, Run.id == Metric.run_id)
            .where(_finished(suite, version), Metric.metric == metric))
    if tasks is not None:
        stmt = stmt.where(Metric.task.in_(list(tasks)))
    if row_filter is not None:
        stmt = stmt.where(row_filter)
    return stmt


def _average_values(suite: str, version: str | None, metric: str, tasks: Sequence[str], row_filter=None):
    """Per (run, sampling seed): the metric averaged over ``tasks`` (pairs lacking a task are dropped)."""
    inner = (select(_group_label().label("grp"), Run.role, Run.id.label("run_id"), Metric.seed,
                    func.avg(Metric.value).label("value"))
             .join(Run, Run.id == Metric.run_id)
             .where(_finished(suite, version), Metric.metric == metric, Metric.task.in_(list(tasks))))
    if row_filter is not None:
        inner = inner.where(row_filter)
    inner = (inner.group_by(_group_label(), Run.role, Run.id, Metric.seed)
             .having(func.count(func.distinct(Metric.task)) == len(tasks))).subquery("pairs")
    return select(inner.c.grp, inner.c.role, inner.c.run_id, literal(AVERAGE).label("key"), inner.c.value)


def leaderboard_long(engine: Engine, suite: str, metric: str, tasks: Sequence[str] | None = None,
                     suite_version: str | None = None, row_filter=None) -> pd.DataFrame:
    """Tidy statistics: one row per (setting, task) plus (setting, ``"average"``) when tasks > 1.

    Columns: setting, role, task, mean, ci95 (half-width), ci_lo, ci_hi, std, n (per-seed values),
    n_runs."""
    version = _version(engine, suite, suite_version)
    if tasks is None:
        tasks = list_tasks(engine, suite, version, metric=metric)
    tasks = list(tasks)
    if not tasks:
        return pd.DataFrame(columns=["setting", "role", "task", *_STAT_COLUMNS[3:]])
    parts = [_stats_from_values(engine, _task_values(suite, version, metric, tasks, row_filter))]
    if len(tasks) > 1:
        parts.append(_stats_from_values(engine, _average_values(suite, version, metric, tasks, row_filter)))
    df = pd.concat([p for p in parts if not p.empty], ignore_index=True) if any(not p.empty for p in parts) \
        else parts[0]
    return df.rename(columns={"grp": "setting", "key": "task"}).reset_index(drop=True)


def _order_rows(df: pd.DataFrame, rank_col: str | None = None) -> pd.DataFrame:
    """Reference rows first (teacher, student-init), then distilled rows by rank, then by name."""
    if df.empty:
        return df
    role_order = {ROLE_TEACHER: 0, ROLE_STUDENT_INIT: 1}
    key = df["role"].map(lambda r: role_order.get(r, 2))
    sort = pd.DataFrame({"k": key, "r": df[rank_col] if rank_col else 0, "s": df["setting"]})
    sort["r"] = pd.to_numeric(sort["r"], errors="coerce").fillna(10**9)
    return df.loc[sort.sort_values(["k", "r", "s"], kind="stable").index].reset_index(drop=True)


def leaderboard(engine: Engine, suite: str, metric: str, tasks: Sequence[str] | None = None,
                suite_version: str | None = None) -> pd.DataFrame:
    """The leaderboard: one row per distilled setting plus the reference rows (teacher, student-init).

    Columns: setting, role, objective, n_runs; per task (and ``average`` when several tasks):
    ``<task>`` (mean), ``<task> ci95`` (half-width), ``<task> ci_lo``, ``<task> ci_hi``,
    ``<task> std``, ``<task> n``; then rank (Int64, distilled rows only), tied_with_best (bool),
    p_vs_best (Welch), and the cost means wall_time_s, train_tokens_per_s, peak_memory_mb.
    ``df.attrs`` holds suite, suite_version, metric, tasks, rank_by, lower_is_better.
    See the module docstring for the statistics."""
    version = _version(engine, suite, suite_version)
    if tasks is None:
        tasks = list_tasks(engine, suite, version, metric=metric)
    tasks = list(tasks)
    keys = tasks + ([AVERAGE] if len(tasks) > 1 else [])
    rank_by = AVERAGE if len(tasks) > 1 else (tasks[0] if tasks else None)
    lower = lower_is_better(metric)
    stats = ["mean", "ci95", "ci_lo", "ci_hi", "std", "n"]
    columns = ["setting", "role", "objective", "n_runs"] + [stat_col(k, s) for k in keys for s in stats] \
        + ["rank", "tied_with_best", "p_vs_best", *COST_COLUMNS]
    attrs = dict(suite=suite, suite_version=version, metric=metric, tasks=tasks, rank_by=rank_by,
                 lower_is_better=lower)
    long = leaderboard_long(engine, suite, metric, tasks, version)
    if long.empty:
        out = pd.DataFrame(columns=columns)
        out.attrs.update(attrs)
        return out

    g = _group_label().label("grp")
    meta = _frame(engine, select(g, Run.role, func.min(Run.objective), func.avg(Run.wall_time_s),
                                 func.avg(Run.train_tokens_per_s), func.avg(Run.peak_memory_mb))
                  .where(_finished(suite, version)).group_by(g, Run.role),
                  ["setting", "role", "objective", *COST_COLUMNS])
    rows = long.groupby(["setting", "role"], sort=False)["n_runs"].max().rename("n_runs").reset_index()
    df = rows.merge(meta, on=["setting", "role"], how="left")
    for k in keys:
        part = long[long.task == k].set_index(["setting", "role"])[stats]
        part.columns = [stat_col(k, s) for s in stats]
        df = df.merge(part, left_on=["setting", "role"], right_index=True, how="left")
    for k in keys:
        df[stat_col(k, "n")] = df[stat_col(k, "n")].astype("Int64")

    # rank and tie with the best, distilled rows only
    score = df[stat_col(rank_by)].astype("float64")
    distilled = (df.role == ROLE_DISTILLED) & score.notna()
    df["rank"] = pd.Series(pd.NA, index=df.index, dtype="Int64")
    df["tied_with_best"] = False
    df["p_vs_best"] = math.nan
    if distilled.any():
        ranks = score[distilled].rank(method="min", ascending=lower).astype("int64")
        df.loc[distilled, "rank"] = ranks
        best = (score[distilled].idxmin() if lower else score[distilled].idxmax())
        b = df.loc[best]
        for i in df.index[distilled]:
            r = df.loc[i]
            if i == best:
                df.at[i, "tied_with_best"] = True
                continue
            p, _, _ = welch(float(r[stat_col(rank_by)]), float(r[stat_col(rank_by, "std")]),
                            float(r[stat_col(rank_by, "n")]), float(b[stat_col(rank_by)]),
                            float(b[stat_col(rank_by, "std")]), float(b[stat_col(rank_by, "n")]))
            df.at[i, "p_vs_best"] = p
            df.at[i, "tied_with_best"] = bool(math.isnan(p) or p >= ALPHA)
    df["tied_with_best"] = df["tied_with_best"].astype(bool)
    out = _order_rows(df[columns], "rank")
    out.attrs.update(attrs)
    return out


# ---------------------------------------------------------------------------- one run


def run_summary(engine: Engine, run_id: int) -> pd.DataFrame:
    """Per (task, metric) of one run over its sampling seeds: mean, std, ci_lo, ci_hi (95 %, Student-t),
    n_seeds. The CLI's ``kdbench show`` and end-of-run table use this."""
    values = (select(literal("run").label("grp"), literal("run").label("role"), Metric.run_id.label("run_id"),
                     (Metric.task + literal("\x1f") + Metric.metric).label("key"), Metric.value.label("value"))
              .where(Metric.run_id == int(run_id)))
    st = _stats_from_values(engine, values)
    cols = ["task", "metric", "mean", "std", "ci_lo", "ci_hi", "n_seeds"]
    if st.empty:
        return pd.DataFrame(columns=cols)
    st[["task", "metric"]] = st["key"].str.split("\x1f", n=1, expand=True)
    st = st.rename(columns={"n": "n_seeds"})[cols]
    st["n_seeds"] = st["n_seeds"].astype("int64")
    return st.sort_values(["task", "metric"], kind="stable").reset_index(drop=True)


def run_metrics(engine: Engine, run_id: int, wide: bool = True) -> pd.DataFrame:
    """The run's per-seed metric values: long (task, metric, seed, value) or wide (one column per seed)."""
    df = _frame(engine, select(Metric.task, Metric.metric, Metric.seed, Metric.value)
                .where(Metric.run_id == int(run_id)).order_by(Metric.task, Metric.metric, Metric.seed))
    if not wide or df.empty:
        return df
    df["seed"] = df["seed"].map(lambda s: "no seed" if pd.isna(s) else f"seed {int(s)}")
    return df.pivot_table(index=["task", "metric"], columns="seed", values="value", aggfunc="mean").reset_index() \
        .rename_axis(columns=None)


def _as_dict(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v if v is not None else {}


def run_detail(engine: Engine, run_id: int) -> dict | None:
    """Every column of one run as a dict (config / provenance / params decoded), plus
    ``teacher_run_id`` (the teacher reference run used for side-by-side samples) and ``n_curve``,
    ``n_samples``, ``n_metrics``; None when the run does not exist."""
    with engine.connect() as c:
        row = c.execute(select(Run.__table__).where(Run.id == int(run_id))).mappings().first()
        if row is None:
            return None
        d = dict(row)
        for k in ("config", "provenance", "params"):
            d[k] = _as_dict(d.get(k))
        d["n_metrics"] = c.execute(select(func.count(Metric.id)).where(Metric.run_id == d["id"])).scalar()
        d["n_samples"] = c.execute(select(func.count(Sample.id)).where(Sample.run_id == d["id"])).scalar()
        d["n_curve"] = c.execute(select(func.count(CurvePoint.id)).where(CurvePoint.run_id == d["id"])).scalar()
    d["teacher_run_id"] = teacher_run_for(engine, d["id"])
    return d


def teacher_run_for(engine: Engine, run_id: int) -> int | None:
    """The finished teacher reference run of the run's suite and version; when several, the one whose
    ``config["reference_fingerprint"]`` matches the run's (if the run records one), else the newest."""
    with engine.connect() as c:
        r = c.execute(select(Run.suite, Run.suite_version, Run.role, Run.config).where(Run.id == int(run_id))).first()
        if r is None:
            return None
        if r.role == ROLE_TEACHER:
            return int(run_id)
        cands = c.execute(select(Run.id, Run.config).where(Run.role == ROLE_TEACHER, Run.suite == r.suite,
                                                           Run.suite_version == r.suite_version,
                                                           Run.status == FINISHED).order_by(Run.id.desc())).all()
    if not cands:
        return None
    fp = (_as_dict(r.config) or {}).get("reference_fingerprint") if isinstance(_as_dict(r.config), dict) else None
    if fp is not None:
        for cid, cfg in cands:
            cfg = _as_dict(cfg)
            if isinstance(cfg, dict) and cfg.get("reference_fingerprint") == fp:
                return int(cid)
    return int(cands[0][0])


def curves(engine: Engine, run_id: int) -> pd.DataFrame:
    """Training curve rows (step, split, loss, lr, tokens, elapsed_s) with the objective's terms expanded
    into one column each (``attrs["terms"]`` lists them), ordered by split and step."""
    df = _frame(engine, select(CurvePoint.step, CurvePoint.split, CurvePoint.loss, CurvePoint.lr,
                               CurvePoint.tokens, CurvePoint.elapsed_s, CurvePoint.terms)
                .where(CurvePoint.run_id == int(run_id)).order_by(CurvePoint.split, CurvePoint.step))
    terms: list[str] = []
    if not df.empty:
        t = pd.json_normalize([_as_dict(x) if isinstance(_as_dict(x), dict) else {} for x in df.pop("terms")])
        t = t.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
        terms = [c for c in t.columns if c not in df.columns]
        df = pd.concat([df, t[terms].set_axis(df.index)], axis=1)
    else:
        df = df.drop(columns=["terms"])
    df.attrs["terms"] = terms
    return df


def _references(ref: Any) -> list[str]:
    """samples.reference: a JSON list string when a prompt has several references."""
    if ref is None:
        return []
    if isinstance(ref, str) and ref.startswith("["):
        try:
            v = json.loads(ref)
            if isinstance(v, list):
                return [str(x) for x in v]
        except ValueError:
            pass
    return [str(ref)]


def _sample_filter(run_id: int, task: str | None, seed: int | None):
    cond = [Sample.run_id == int(run_id)]
    if task is not None:
        cond.append(Sample.task == task)
    if seed is not None:
        cond.append(Sample.seed == int(seed))
    return and_(*cond)


def count_samples(engine: Engine, run_id: int, task: str | None = None, seed: int | None = None) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count(Sample.id)).where(_sample_filter(run_id, task, seed))).scalar())


def sample_seeds(engine: Engine, run_id: int, task: str | None = None) -> list[int | None]:
    stmt = select(Sample.seed).where(_sample_filter(run_id, task, None)).distinct().order_by(Sample.seed)
    with engine.connect() as c:
        return list(c.execute(stmt).scalars())


def sample_tasks(engine: Engine, run_id: int) -> list[str]:
    stmt = select(Sample.task).where(Sample.run_id == int(run_id)).distinct().order_by(Sample.task)
    with engine.connect() as c:
        return list(c.execute(stmt).scalars())


def score_names(engine: Engine, suite: str, task: str, suite_version: str | None = None,
                probe: int = 200) -> list[str]:
    """Per-sample score names (keys of samples.scores) of a task, from a bounded probe of its samples."""
    version = _version(engine, suite, suite_version)
    stmt = (select(Sample.scores).join(Run, Run.id == Sample.run_id)
            .where(_finished(suite, version), Sample.task == task).limit(int(probe)))
    with engine.connect() as c:
        found = [_as_dict(s) for s in c.execute(stmt).scalars()]
    names = sorted({k for s in found if isinstance(s, dict) for k in s})
    return sorted(names, key=lambda m: (_PREFERRED_METRICS.index(m) if m in _PREFERRED_METRICS
                                        else len(_PREFERRED_METRICS), m.lower()))


def samples(engine: Engine, run_id: int, task: str | None = None, seed: int | None = None, limit: int = 20,
            offset: int = 0, with_teacher: bool = True) -> pd.DataFrame:
    """A page of the run's samples (ordered by task, prompt_id, seed): task, prompt_id, seed, prompt,
    output, references (list), scores (dict), one column per score, and teacher_output (the teacher
    reference run's response to the same task / prompt_id / seed; None without one)."""
    teacher_id = teacher_run_for(engine, run_id) if with_teacher else None
    t = aliased(Sample)
    cols = [Sample.task, Sample.prompt_id, Sample.seed, Sample.prompt, Sample.output, Sample.reference, Sample.scores]
    stmt = select(*cols, (t.output if teacher_id is not None else literal(None)).label("teacher_output"))
    if teacher_id is not None:
        stmt = stmt.outerjoin(t, and_(t.run_id == teacher_id, t.task == Sample.task, t.prompt_id == Sample.prompt_id,
                                      t.seed.is_not_distinct_from(Sample.seed)))
    stmt = (stmt.where(_sample_filter(run_id, task, seed))
            .order_by(Sample.task, Sample.prompt_id, Sample.seed, Sample.id).limit(int(limit)).offset(int(offset)))
    df = _frame(engine, stmt, ["task", "prompt_id", "seed", "prompt", "output", "reference", "scores",
                               "teacher_output"])
    df["references"] = [_references(r) for r in df.pop("reference")]
    df["scores"] = [_as_dict(s) if isinstance(_as_dict(s), dict) else {} for s in df["scores"]]
    score_names = sorted({k for s in df["scores"] for k in s})
    for k in score_names:
        df[k] = [s.get(k) for s in df["scores"]]
    df.attrs["score_names"] = score_names
    df.attrs["teacher_run_id"] = teacher_id
    order = ["task", "prompt_id", "seed", "prompt", "output", "references", "teacher_output", *score_names, "scores"]
    return df[order]


# ---------------------------------------------------------------------------- comparisons


def compare(engine: Engine, suite: str, setting_a: str, setting_b: str, metric: str,
            tasks: Sequence[str] | None = None, suite_version: str | None = None) -> pd.DataFrame:
    """Per-task comparison of two leaderboard rows (a setting, ``teacher`` / ``student-init``, or
    ``run:<id>``): mean_a, ci95_a, n_a, mean_b, ci95_b, n_b, delta = mean_a - mean_b with a Welch CI
    (delta_lo, delta_hi) and p_value, and ``better`` ('a', 'b' or '≈' when p >= 0.05 or undefined),
    honouring the metric's direction. An ``average`` row follows when several tasks are compared."""
    version = _version(engine, suite, suite_version)
    cols = ["task", "mean_a", "ci95_a", "n_a", "mean_b", "ci95_b", "n_b", "delta", "delta_lo", "delta_hi",
            "p_value", "better"]
    if tasks is None:
        tasks = list_tasks(engine, suite, version, metric=metric)
    sides = []
    for sel in (setting_a, setting_b):
        st = leaderboard_long(engine, suite, metric, tasks, version, row_filter=_selector_condition(sel))
        # a run selector may span one group; a setting exactly one
        sides.append(st.groupby("task").first() if not st.empty else st.set_index("task"))
    a, b = sides
    keys = [k for k in list(tasks) + [AVERAGE] if k in a.index and k in b.index]
    lower = lower_is_better(metric)
    out = []
    for k in keys:
        ra, rb = a.loc[k], b.loc[k]
        delta = float(ra["mean"]) - float(rb["mean"])
        p, half, _ = welch(float(ra["mean"]), float(ra["std"]), float(ra["n"]),
                           float(rb["mean"]), float(rb["std"]), float(rb["n"]))
        if math.isnan(p) or p >= ALPHA:
            better = "≈"
        else:
            better = "a" if (delta < 0) == lower else "b"
        out.append((k, float(ra["mean"]), float(ra["ci95"]), int(ra["n"]), float(rb["mean"]), float(rb["ci95"]),
                    int(rb["n"]), delta, delta - half, delta + half, p, better))
    df = pd.DataFrame(out, columns=cols)
    df.attrs.update(dict(suite=suite, suite_version=version, metric=metric, a=setting_a, b=setting_b,
                         lower_is_better=lower))
    return df


def _run_ids(suite: str, version: str | None, sel: str):
    return select(Run.id).where(_finished(suite, version), _selector_condition(sel))


def prompts_differing_most(engine: Engine, suite: str, setting_a: str, setting_b: str, task: str,
                           metric: str = "rougeL", limit: int = 10, suite_version: str | None = None) -> pd.DataFrame:
    """Prompts whose per-prompt score (``samples.scores[metric]``, averaged in SQL over every sampling
    seed and run of the row) differs most between a and b: prompt_id, prompt, references, score_a,
    score_b, diff (a - b), n_a, n_b, output_a, output_b (each side's first sample: lowest run id,
    then lowest seed), seed_a, seed_b. Ordered by |diff| descending, then prompt_id."""
    version = _version(engine, suite, suite_version)
    score = Sample.scores[metric].as_float()

    def side(sel: str, name: str):
        return (select(Sample.prompt_id.label("prompt_id"), func.avg(score).label("score"),
                       func.count(score).label("n"), func.min(Sample.id).label("first_id"))
                .where(Sample.run_id.in_(_run_ids(suite, version, sel)), Sample.task == task)
                .group_by(Sample.prompt_id).subquery(name))

    a, b = side(setting_a, "a"), side(setting_b, "b")
    diff = (a.c.score - b.c.score)
    stmt = (select(a.c.prompt_id, a.c.score, b.c.score, diff, a.c.n, b.c.n, a.c.first_id, b.c.first_id)
            .join(b, b.c.prompt_id == a.c.prompt_id)
            .where(a.c.score.is_not(None), b.c.score.is_not(None))
            .order_by(func.abs(diff).desc(), a.c.prompt_id).limit(int(limit)))
    top = _frame(engine, stmt, ["prompt_id", "score_a", "score_b", "diff", "n_a", "n_b", "id_a", "id_b"])
    cols = ["prompt_id", "prompt", "references", "score_a", "score_b", "diff", "n_a", "n_b", "output_a",
            "output_b", "seed_a", "seed_b"]
    if top.empty:
        return pd.DataFrame(columns=cols)
    ids = [int(i) for i in pd.concat([top.id_a, top.id_b])]
    with engine.connect() as c:
        rows = {r.id: r for r in c.execute(select(Sample.id, Sample.prompt, Sample.output, Sample.reference,
                                                  Sample.seed).where(Sample.id.in_(ids)))}
    top["prompt"] = [rows[int(i)].prompt for i in top.id_a]
    top["references"] = [_references(rows[int(i)].reference) for i in top.id_a]
    top["output_a"] = [rows[int(i)].output for i in top.id_a]
    top["output_b"] = [rows[int(i)].output for i in top.id_b]
    top["seed_a"] = [rows[int(i)].seed for i in top.id_a]
    top["seed_b"] = [rows[int(i)].seed for i in top.id_b]
    return top[cols].reset_index(drop=True)


def fidelity_diversity(engine: Engine, suite: str, task: str, fidelity: str = "rougeL",
                       diversity: Sequence[str] | None = None, suite_version: str | None = None) -> pd.DataFrame:
    """Per leaderboard row of one task: the fidelity metric and the diversity metrics (default: those of
    self_bleu, distinct_2 present) each as ``<m>`` (mean), ``<m> ci95``, ``<m> ci_lo``, ``<m> ci_hi``,
    ``<m> n`` — the error bars of the fidelity–diversity plot. Columns setting, role first."""
    version = _version(engine, suite, suite_version)
    present = list_metrics(engine, suite, task, version)
    if diversity is None:
        diversity = [m for m in ("self_bleu", "distinct_2") if m in present]
    metrics = [m for m in [fidelity, *diversity] if m in present]
    stats = ["mean", "ci95", "ci_lo", "ci_hi", "n"]
    cols = ["setting", "role"] + [stat_col(m, s) for m in metrics for s in stats]
    if not metrics:
        return pd.DataFrame(columns=cols)
    values = (select(_group_label().label("grp"), Run.role, Run.id.label("run_id"), Metric.metric.label("key"),
                     Metric.value.label("value"))
              .join(Run, Run.id == Metric.run_id)
              .where(_finished(suite, version), Metric.task == task, Metric.metric.in_(metrics)))
    long = _stats_from_values(engine, values)
    if long.empty:
        return pd.DataFrame(columns=cols)
    df = long[["grp", "role"]].drop_duplicates().rename(columns={"grp": "setting"})
    for m in metrics:
        part = long[long.key == m].set_index(["grp", "role"])[stats]
        part.columns = [stat_col(m, s) for s in stats]
        df = df.merge(part, left_on=["setting", "role"], right_index=True, how="left")
    out = _order_rows(df[cols])
    out.attrs.update(dict(suite=suite, suite_version=version, task=task, fidelity=fidelity,
                          diversity=list(diversity)))
    return out


# ---------------------------------------------------------------------------- analysis artifacts


def grad_similarity(engine: Engine, suite: str | None = None) -> dict | None:
    """The newest ``grad_similarity`` artifact of a finished analysis run (of the suite when given):
    its data dict plus ``run_id`` and ``suite``; None when there is none."""
    stmt = (select(Artifact.data, Artifact.run_id, Run.suite).join(Run, Run.id == Artifact.run_id)
            .where(Artifact.name == "grad_similarity", Run.status == FINISHED, Run.role == ROLE_ANALYSIS)
            .order_by(Artifact.id.desc()).limit(1))
    if suite is not None:
        stmt = stmt.where(Run.suite == suite)
    with engine.connect() as c:
        row = c.execute(stmt).first()
    if row is None:
        return None
    data = _as_dict(row.data)
    if not isinstance(data, dict) or "names" not in data:
        return None
    return {**data, "run_id": int(row.run_id), "suite": row.suite}


def grad_similarity_long(data: dict) -> pd.DataFrame:
    """The matrices of a grad_similarity artifact as rows (row, col, cosine, norm_ratio) for a heatmap."""
    names = list(data.get("names", []))
    cos = data.get("cosine") or []
    ratio = data.get("norm_ratio") or []
    out = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            c = cos[i][j] if i < len(cos) and j < len(cos[i]) else None
            r = ratio[i][j] if i < len(ratio) and j < len(ratio[i]) else None
            out.append((a, b, c, r))
    return pd.DataFrame(out, columns=["row", "col", "cosine", "norm_ratio"])


# ---------------------------------------------------------------------------- export


def _fmt(v: Any, decimals: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    return f"{float(v):.{decimals}f}"


def to_markdown(df: pd.DataFrame, decimals: int = 2, include_cost: bool = False) -> str:
    """A paper-style Markdown table of :func:`leaderboard`'s output: one column per task (and Avg.)
    with ``mean ± CI half-width``; the best distilled value of each column in bold; reference rows
    in italics; a ``≈`` after rows whose ranking score is not distinguishable from the best.

    Other DataFrames are rendered cell by cell (floats to ``decimals``)."""
    attrs = df.attrs or {}
    if "tasks" not in attrs:
        return _plain_markdown(df, decimals)
    tasks = list(attrs["tasks"])
    keys = tasks + ([AVERAGE] if len(tasks) > 1 else [])
    lower = bool(attrs.get("lower_is_better"))
    header = ["Setting"] + [("Avg." if k == AVERAGE else k) for k in keys] + ["Rank"]
    if include_cost:
        header += ["Wall time (s)", "Train tok/s", "Peak mem (MB)"]
    best: dict[str, float] = {}
    dist = df[df.role == ROLE_DISTILLED] if not df.empty else df
    for k in keys:
        col = pd.to_numeric(dist[stat_col(k)], errors="coerce").dropna() if not dist.empty else pd.Series(dtype=float)
        if not col.empty:
            best[k] = col.min() if lower else col.max()
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [" ---: "] * (len(header) - 1)) + "|"]
    for _, r in df.iterrows():
        ref = r["role"] != ROLE_DISTILLED
        name = _md_escape(str(r["setting"]))
        name = f"*{name}*" if ref else name
        if not ref and bool(r.get("tied_with_best")) and not pd.isna(r.get("rank")) and int(r["rank"]) != 1:
            name += " ≈"
        cells = [name]
        for k in keys:
            m, h = r[stat_col(k)], r[stat_col(k, "ci95")]
            cell = _fmt(m, decimals) + ("" if pd.isna(h) else f" ± {_fmt(h, decimals)}")
            if not ref and k in best and not pd.isna(m) and round(float(m), decimals) == round(best[k], decimals):
                cell = f"**{cell}**"
            cells.append(cell)
        cells.append("" if pd.isna(r["rank"]) else str(int(r["rank"])))
        if include_cost:
            cells += [_fmt(r.get("wall_time_s"), 1), _fmt(r.get("train_tokens_per_s"), 0),
                      _fmt(r.get("peak_memory_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    arrow = "lower is better" if lower else "higher is better"
    caption = (f"{attrs.get('metric')} ({arrow}) on suite {attrs.get('suite')} v{attrs.get('suite_version')}: "
               f"mean over sampling seeds, then over training seeds; ± is the 95% Student-t half-width over all "
               f"per-seed values; bold: best; ≈: not distinguishable from the best (Welch t-test, p ≥ {ALPHA}).")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _plain_markdown(df: pd.DataFrame, decimals: int) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_escape(c) for c in cols) + " |", "|" + "|".join([" --- "] * len(cols)) + "|"]
    for row in df.itertuples(index=False):
        cells = [_fmt(v, decimals) if isinstance(v, float) else ("" if v is None or v is pd.NA else _md_escape(str(v)))
                 for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
