"""The leaderboard and the fidelity–diversity table: per-seed values selected in SQL, aggregated per run in
the database, pooled per row (setting or reference role) by :func:`kdbench.results.stats.pool`."""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
from sqlalchemy import and_, func, literal, select
from sqlalchemy.engine import Engine

from kdbench.results.queries import (
    finished_in,
    frame,
    group_label,
    list_metrics,
    list_tasks,
    order_rows,
    resolve_version,
)
from kdbench.results.stats import ALPHA, AVERAGE, STAT_COLUMNS, lower_is_better, pool, stat_col, welch
from kdbench.store import ROLE_DISTILLED, Metric, Run

COST_COLUMNS = ("wall_time_s", "train_tokens_per_s", "peak_memory_mb")
_STATS = ["mean", "ci95", "ci_lo", "ci_hi", "std", "n"]


def stats_from_values(engine: Engine, values) -> pd.DataFrame:
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
    return pool(frame(engine, stmt, ["grp", "role", "run_id", "key", "rn", "rmean", "ss"]))


def _task_values(suite: str, version: str | None, metric: str, tasks: Sequence[str] | None, row_filter=None):
    stmt = (select(group_label().label("grp"), Run.role, Run.id.label("run_id"), Metric.task.label("key"),
                   Metric.value.label("value"))
            .join(Run, Run.id == Metric.run_id)
            .where(finished_in(suite, version), Metric.metric == metric))
    if tasks is not None:
        stmt = stmt.where(Metric.task.in_(list(tasks)))
    if row_filter is not None:
        stmt = stmt.where(row_filter)
    return stmt


def _average_values(suite: str, version: str | None, metric: str, tasks: Sequence[str], row_filter=None):
    """Per (run, sampling seed): the metric averaged over ``tasks`` (pairs lacking a task are dropped)."""
    inner = (select(group_label().label("grp"), Run.role, Run.id.label("run_id"), Metric.seed,
                    func.avg(Metric.value).label("value"))
             .join(Run, Run.id == Metric.run_id)
             .where(finished_in(suite, version), Metric.metric == metric, Metric.task.in_(list(tasks))))
    if row_filter is not None:
        inner = inner.where(row_filter)
    inner = (inner.group_by(group_label(), Run.role, Run.id, Metric.seed)
             .having(func.count(func.distinct(Metric.task)) == len(tasks))).subquery("pairs")
    return select(inner.c.grp, inner.c.role, inner.c.run_id, literal(AVERAGE).label("key"), inner.c.value)


def leaderboard_long(engine: Engine, suite: str, metric: str, tasks: Sequence[str] | None = None,
                     suite_version: str | None = None, row_filter=None) -> pd.DataFrame:
    """Tidy statistics: one row per (setting, task) plus (setting, ``"average"``) when tasks > 1.

    Columns: setting, role, task, mean, ci95 (half-width), ci_lo, ci_hi, std, n (per-seed values),
    n_runs."""
    version = resolve_version(engine, suite, suite_version)
    if tasks is None:
        tasks = list_tasks(engine, suite, version, metric=metric)
    tasks = list(tasks)
    if not tasks:
        return pd.DataFrame(columns=["setting", "role", "task", *STAT_COLUMNS[3:]])
    parts = [stats_from_values(engine, _task_values(suite, version, metric, tasks, row_filter))]
    if len(tasks) > 1:
        parts.append(stats_from_values(engine, _average_values(suite, version, metric, tasks, row_filter)))
    nonempty = [p for p in parts if not p.empty]
    df = pd.concat(nonempty, ignore_index=True) if nonempty else parts[0]
    return df.rename(columns={"grp": "setting", "key": "task"}).reset_index(drop=True)


def _rank(df: pd.DataFrame, rank_by: str, lower: bool) -> None:
    """Adds rank, tied_with_best and p_vs_best (Welch against the best) to the distilled rows, in place."""
    score = df[stat_col(rank_by)].astype("float64")
    distilled = (df.role == ROLE_DISTILLED) & score.notna()
    df["rank"] = pd.Series(pd.NA, index=df.index, dtype="Int64")
    df["tied_with_best"] = False
    df["p_vs_best"] = math.nan
    if not distilled.any():
        return
    df.loc[distilled, "rank"] = score[distilled].rank(method="min", ascending=lower).astype("int64")
    best = df.loc[score[distilled].idxmin() if lower else score[distilled].idxmax()]

    def summary(r) -> tuple[float, float, float]:
        return float(r[stat_col(rank_by)]), float(r[stat_col(rank_by, "std")]), float(r[stat_col(rank_by, "n")])

    for i in df.index[distilled]:
        if i == best.name:
            df.at[i, "tied_with_best"] = True
            continue
        p, _, _ = welch(*summary(df.loc[i]), *summary(best))
        df.at[i, "p_vs_best"] = p
        df.at[i, "tied_with_best"] = bool(math.isnan(p) or p >= ALPHA)


def leaderboard(engine: Engine, suite: str, metric: str, tasks: Sequence[str] | None = None,
                suite_version: str | None = None) -> pd.DataFrame:
    """The leaderboard: one row per distilled setting plus the reference rows (teacher, student-init).

    Columns: setting, role, objective, n_runs; per task (and ``average`` when several tasks):
    ``<task>`` (mean), ``<task> ci95`` (half-width), ``<task> ci_lo``, ``<task> ci_hi``,
    ``<task> std``, ``<task> n``; then rank (Int64, distilled rows only), tied_with_best (bool),
    p_vs_best (Welch), and the cost means wall_time_s, train_tokens_per_s, peak_memory_mb.
    ``df.attrs`` holds suite, suite_version, metric, tasks, rank_by, lower_is_better.
    See :mod:`kdbench.results` for the statistics."""
    version = resolve_version(engine, suite, suite_version)
    if tasks is None:
        tasks = list_tasks(engine, suite, version, metric=metric)
    tasks = list(tasks)
    keys = tasks + ([AVERAGE] if len(tasks) > 1 else [])
    rank_by = AVERAGE if len(tasks) > 1 else (tasks[0] if tasks else None)
    lower = lower_is_better(metric)
    columns = ["setting", "role", "objective", "n_runs"] + [stat_col(k, s) for k in keys for s in _STATS] \
        + ["rank", "tied_with_best", "p_vs_best", *COST_COLUMNS]
    attrs = dict(suite=suite, suite_version=version, metric=metric, tasks=tasks, rank_by=rank_by,
                 lower_is_better=lower)
    long = leaderboard_long(engine, suite, metric, tasks, version)
    if long.empty:
        out = pd.DataFrame(columns=columns)
        out.attrs.update(attrs)
        return out

    g = group_label().label("grp")
    meta = frame(engine, select(g, Run.role, func.min(Run.objective), func.avg(Run.wall_time_s),
                                func.avg(Run.train_tokens_per_s), func.avg(Run.peak_memory_mb))
                 .where(finished_in(suite, version)).group_by(g, Run.role),
                 ["setting", "role", "objective", *COST_COLUMNS])
    rows = long.groupby(["setting", "role"], sort=False)["n_runs"].max().rename("n_runs").reset_index()
    df = rows.merge(meta, on=["setting", "role"], how="left")
    for k in keys:
        part = long[long.task == k].set_index(["setting", "role"])[_STATS]
        part.columns = [stat_col(k, s) for s in _STATS]
        df = df.merge(part, left_on=["setting", "role"], right_index=True, how="left")
        df[stat_col(k, "n")] = df[stat_col(k, "n")].astype("Int64")
    _rank(df, rank_by, lower)
    df["tied_with_best"] = df["tied_with_best"].astype(bool)
    out = order_rows(df[columns], "rank")
    out.attrs.update(attrs)
    return out


def fidelity_diversity(engine: Engine, suite: str, task: str, fidelity: str = "rougeL",
                       diversity: Sequence[str] | None = None, suite_version: str | None = None) -> pd.DataFrame:
    """Per leaderboard row of one task: the fidelity metric and the diversity metrics (default: those of
    self_bleu, distinct_2 present) each as ``<m>`` (mean), ``<m> ci95``, ``<m> ci_lo``, ``<m> ci_hi``,
    ``<m> n`` — the error bars of the fidelity–diversity plot. Columns setting, role first."""
    version = resolve_version(engine, suite, suite_version)
    present = list_metrics(engine, suite, task, version)
    if diversity is None:
        diversity = [m for m in ("self_bleu", "distinct_2") if m in present]
    metrics = [m for m in [fidelity, *diversity] if m in present]
    stats = ["mean", "ci95", "ci_lo", "ci_hi", "n"]
    cols = ["setting", "role"] + [stat_col(m, s) for m in metrics for s in stats]
    if not metrics:
        return pd.DataFrame(columns=cols)
    values = (select(group_label().label("grp"), Run.role, Run.id.label("run_id"), Metric.metric.label("key"),
                     Metric.value.label("value"))
              .join(Run, Run.id == Metric.run_id)
              .where(finished_in(suite, version), Metric.task == task, Metric.metric.in_(metrics)))
    long = stats_from_values(engine, values)
    if long.empty:
        return pd.DataFrame(columns=cols)
    df = long[["grp", "role"]].drop_duplicates().rename(columns={"grp": "setting"})
    for m in metrics:
        part = long[long.key == m].set_index(["grp", "role"])[stats]
        part.columns = [stat_col(m, s) for s in stats]
        df = df.merge(part, left_on=["setting", "role"], right_index=True, how="left")
    out = order_rows(df[cols])
    out.attrs.update(dict(suite=suite, suite_version=version, task=task, fidelity=fidelity,
                          diversity=list(diversity)))
    return out
