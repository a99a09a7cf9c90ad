"""The leaderboard and the fidelity–diversity table: per-seed values selected in SQL, repeats averaged and
aggregated per (row, training seed) in the database, pooled per row (setting or reference role) by
:func:`kdbench.results.stats.pool`; row-vs-best, row-vs-ce and band comparisons by the paired bootstrap of
:mod:`kdbench.results.paired` (Welch on the per-seed values where a metric has no per-sample score)."""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
from sqlalchemy import and_, func, literal, select
from sqlalchemy.engine import Engine

from kdbench.results.equivalence import gradient_classes
from kdbench.results.paired import PairedData
from kdbench.results.queries import (
    finished_in,
    frame,
    group_label,
    list_metrics,
    metric_tasks,
    order_rows,
    resolve_version,
)
from kdbench.results.stats import ALPHA, AVERAGE, STAT_COLUMNS, lower_is_better, pool, stat_col, welch
from kdbench.store import ROLE_DISTILLED, Artifact, Metric, Run

COST_COLUMNS = ("wall_time_s", "train_tokens_per_s", "peak_memory_mb")
#: What on-policy sampling cost (each run's ``cost`` artifact, kdbench/engine/samplers.py ``cost()``):
#: mean seconds of student generation inside training, its generated tokens per second, and the
#: live teacher's scoring seconds.
SAMPLER_COST_COLUMNS = ("generation_s", "generated_tokens_per_s", "teacher_scoring_s")
_STATS = ["mean", "ci95", "ci_lo", "ci_hi", "std", "n"]


def stats_from_values(engine: Engine, values) -> pd.DataFrame:
    """values: a select with columns (grp, role, obs, key, sseed, value), one row per stored value: obs
    identifies an observation (the training seed; repeat runs of one seed share it), sseed the sampling
    seed (NULL for a seed-free metric).

    SQL first averages repeats per (grp, role, obs, key, sseed), then computes per (grp, role, obs, key):
    n, mean and the sum of squared deviations from the observation's mean; pandas pools those (small)
    rows per (grp, key) into mean (of observation means), std and n over all per-seed values, n_runs
    (observations = distinct training seeds) and the CI."""
    v0 = values.subquery("v0")
    v = (select(v0.c.grp, v0.c.role, v0.c.obs.label("run_id"), v0.c.key, func.avg(v0.c.value).label("value"))
         .group_by(v0.c.grp, v0.c.role, v0.c.obs, v0.c.key, v0.c.sseed).subquery("v"))
    rm = (select(v.c.grp, v.c.role, v.c.run_id, v.c.key, func.avg(v.c.value).label("rmean"),
                 func.count().label("rn"))
          .group_by(v.c.grp, v.c.role, v.c.run_id, v.c.key).subquery("rm"))
    dev = (v.c.value - rm.c.rmean)
    on = and_(rm.c.grp == v.c.grp, rm.c.role == v.c.role, rm.c.run_id == v.c.run_id, rm.c.key == v.c.key)
    stmt = (select(v.c.grp, v.c.role, v.c.run_id, v.c.key, rm.c.rn, rm.c.rmean, func.sum(dev * dev).label("ss"))
            .join(rm, on).group_by(v.c.grp, v.c.role, v.c.run_id, v.c.key, rm.c.rn, rm.c.rmean))
    return pool(frame(engine, stmt, ["grp", "role", "run_id", "key", "rn", "rmean", "ss"]))


def _task_values(suite: str, version: str | None, metric: str, tasks: Sequence[str] | None, row_filter=None):
    stmt = (select(group_label().label("grp"), Run.role, Run.seed.label("obs"), Metric.task.label("key"),
                   Metric.seed.label("sseed"), Metric.value.label("value"))
            .join(Run, Run.id == Metric.run_id)
            .where(finished_in(suite, version), Metric.metric == metric))
    if tasks is not None:
        stmt = stmt.where(Metric.task.in_(list(tasks)))
    if row_filter is not None:
        stmt = stmt.where(row_filter)
    return stmt


def _average_values(suite: str, version: str | None, metric: str, tasks: Sequence[str], row_filter=None):
    """Per (run, sampling seed): the metric averaged over ``tasks`` (pairs lacking a task are dropped)."""
    inner = (select(group_label().label("grp"), Run.role, Run.seed.label("obs"), Metric.seed.label("sseed"),
                    func.avg(Metric.value).label("value"))
             .join(Run, Run.id == Metric.run_id)
             .where(finished_in(suite, version), Metric.metric == metric, Metric.task.in_(list(tasks))))
    if row_filter is not None:
        inner = inner.where(row_filter)
    inner = (inner.group_by(group_label(), Run.role, Run.id, Run.seed, Metric.seed)
             .having(func.count(func.distinct(Metric.task)) == len(tasks))).subquery("pairs")
    return select(inner.c.grp, inner.c.role, inner.c.obs, literal(AVERAGE).label("key"), inner.c.sseed,
                  inner.c.value)


def leaderboard_long(engine: Engine, suite: str, metric: str, tasks: Sequence[str] | None = None,
                     suite_version: str | None = None, row_filter=None) -> pd.DataFrame:
    """Tidy statistics: one row per (setting, task) plus (setting, ``"average"``) when tasks > 1.

    Columns: setting, role, task, mean, ci95 (half-width), ci_lo, ci_hi, std, n (per-seed values),
    n_runs."""
    version = resolve_version(engine, suite, suite_version)
    if tasks is None:
        tasks = metric_tasks(engine, suite, version, metric)
    tasks = list(tasks)
    if not tasks:
        return pd.DataFrame(columns=["setting", "role", "task", *STAT_COLUMNS[3:]])
    parts = [stats_from_values(engine, _task_values(suite, version, metric, tasks, row_filter))]
    if len(tasks) > 1:
        parts.append(stats_from_values(engine, _average_values(suite, version, metric, tasks, row_filter)))
    nonempty = [p for p in parts if not p.empty]
    df = pd.concat(nonempty, ignore_index=True) if nonempty else parts[0]
    return df.rename(columns={"grp": "setting", "key": "task"}).reset_index(drop=True)


def _welch_vs(df: pd.DataFrame, i, j, key: str) -> dict:
    """Welch's test of row i - row j on the per-seed values of ``key`` (the fallback without per-sample
    scores)."""
    def summary(r) -> tuple[float, float, float]:
        return float(r[stat_col(key)]), float(r[stat_col(key, "std")]), float(r[stat_col(key, "n")])

    ri, rj = df.loc[i], df.loc[j]
    (mi, si, ni), (mj, sj, nj) = summary(ri), summary(rj)
    p, half, _ = welch(mi, si, ni, mj, sj, nj)
    delta = mi - mj
    return dict(mean=delta, lo=delta - half, hi=delta + half, p=p, test="welch",
                defined=not math.isnan(p), separated=bool(not math.isnan(p) and p < ALPHA))


class _Comparer:
    """Row-vs-row tests for one leaderboard key: the paired bootstrap on per-sample scores where both rows
    have aligned scores, else Welch on the per-seed values."""

    def __init__(self, df: pd.DataFrame, key: str, paired: PairedData | None, tasks: list[str]):
        self.df, self.key, self.paired, self.tasks = df, key, paired, tasks
        self._cache: dict = {}

    def __call__(self, i, j) -> dict:
        if (i, j) not in self._cache:
            a, b = self.df.at[i, "setting"], self.df.at[j, "setting"]
            r = self.paired.test(a, b, self.tasks) if self.paired is not None else None
            if r is None or not r["defined"]:
                r = _welch_vs(self.df, i, j, self.key)
            self._cache[(i, j)] = r
        return self._cache[(i, j)]


def _rank(df: pd.DataFrame, rank_by: str, lower: bool, paired: PairedData | None, tasks: list[str],
          classes: list[dict]) -> list[dict]:
    """Adds rank, tied_with_best, p_vs_best, delta_vs_best (lo, hi), test_vs_best, equiv_class, delta_vs_ce
    (lo, hi), p_vs_ce, vs_ce, band_recovered (band_lo, band_hi) in place; returns the classes present
    with their paired verdicts (``shared_rank``, ``tests``)."""
    score = df[stat_col(rank_by)].astype("float64")
    distilled = (df.role == ROLE_DISTILLED) & score.notna()
    df["rank"] = pd.Series(pd.NA, index=df.index, dtype="Int64")
    df["tied_with_best"] = False
    for c in ("p_vs_best", "delta_vs_best", "delta_vs_best_lo", "delta_vs_best_hi", "delta_vs_ce",
              "delta_vs_ce_lo", "delta_vs_ce_hi", "p_vs_ce", "band_recovered", "band_lo", "band_hi"):
        df[c] = math.nan
    df["test_vs_best"] = ""
    df["vs_ce"] = ""
    df["equiv_class"] = ""
    if not distilled.any():
        return []
    cmp = _Comparer(df, rank_by, paired, tasks)
    best_i = score[distilled].idxmin() if lower else score[distilled].idxmax()

    def better_first(idx):
        return sorted(idx, key=lambda i: (score[i] if lower else -score[i], df.at[i, "setting"]))

    # equivalence classes: a member the paired test cannot separate from the class's best member is
    # ranked with it (same ranking score, so the same rank)
    adjusted = score.copy()
    present = []
    by_setting = {df.at[i, "setting"]: i for i in df.index[distilled]}
    for c in classes:
        members = better_first([by_setting[m] for m in c["members"] if m in by_setting])
        if len(members) < 2:
            continue
        head, tests = members[0], []
        for i in members[1:]:
            r = cmp(i, head)
            tests.append(dict(setting=df.at[i, "setting"], vs=df.at[head, "setting"], **{
                k: r.get(k) for k in ("mean", "lo", "hi", "p", "test", "separated", "defined")}))
            if not r["separated"]:
                adjusted[i] = adjusted[head]
        for i in members:
            df.at[i, "equiv_class"] = c["label"]
        present.append({**c, "members": [df.at[i, "setting"] for i in members],
                        "shared_rank": not any(t["separated"] for t in tests), "tests": tests})
    df.loc[distilled, "rank"] = adjusted[distilled].rank(method="min", ascending=lower).astype("int64")

    for i in df.index[distilled]:
        if i == best_i:
            df.at[i, "tied_with_best"] = True
            df.at[i, "test_vs_best"] = "best"
            continue
        r = cmp(i, best_i)
        df.at[i, "p_vs_best"] = r["p"]
        df.at[i, "delta_vs_best"], df.at[i, "delta_vs_best_lo"], df.at[i, "delta_vs_best_hi"] = \
            r["mean"], r["lo"], r["hi"]
        df.at[i, "test_vs_best"] = r["test"]
        df.at[i, "tied_with_best"] = not r["separated"]

    # does distillation beat fine-tuning on the data? (the best-scoring ``ce`` row)
    ce = [i for i in better_first(df.index[distilled]) if df.at[i, "objective"] == "ce"]
    if ce:
        for i in df.index[distilled]:
            if i == ce[0]:
                df.at[i, "vs_ce"] = "ce"
                continue
            r = cmp(i, ce[0])
            df.at[i, "delta_vs_ce"], df.at[i, "delta_vs_ce_lo"], df.at[i, "delta_vs_ce_hi"] = r["mean"], r["lo"], r["hi"]
            df.at[i, "p_vs_ce"] = r["p"]
            df.at[i, "vs_ce"] = ("≈" if not r["separated"] else
                                 "better" if (r["mean"] < 0) == lower else "worse")
    if paired is not None:
        for i in df.index[distilled]:
            b = paired.band(df.at[i, "setting"], tasks)
            df.at[i, "band_recovered"], df.at[i, "band_lo"], df.at[i, "band_hi"] = b["mean"], b["lo"], b["hi"]
    return present


def leaderboard(engine: Engine, suite: str, metric: str, tasks: Sequence[str] | None = None,
                suite_version: str | None = None) -> pd.DataFrame:
    """The leaderboard: one row per distilled setting plus the reference rows (teacher, student-init).

    Columns: setting, role, objective, n_runs (distinct training seeds), repeats (finished runs averaged
    into an existing training seed's observation); per task (and ``average`` when several tasks):
    ``<task>`` (mean), ``<task> ci95`` (half-width), ``<task> ci_lo``, ``<task> ci_hi``, ``<task> std``,
    ``<task> n``; then rank (Int64, distilled rows only; members of an equivalence class the paired test
    cannot separate share a rank), tied_with_best (bool), p_vs_best, delta_vs_best, delta_vs_best_lo,
    delta_vs_best_hi (row − best), test_vs_best ('paired bootstrap', 'welch' or 'best'), equiv_class
    (label of the row's gradient class, '' if none), delta_vs_ce (lo, hi), p_vs_ce, vs_ce ('better',
    'worse', '≈', 'ce' for the ce row itself, '' without a ce row), band_recovered, band_lo, band_hi (%
    of the teacher − student-init band recovered, paired CI), and the cost means wall_time_s,
    train_tokens_per_s, peak_memory_mb, and of on-policy rows generation_s, generated_tokens_per_s
    (the student's sampling inside training) and teacher_scoring_s (NaN elsewhere).
    ``df.attrs`` holds suite, suite_version, metric, tasks, rank_by, lower_is_better, score (the
    per-sample score of the paired tests, None without one), classes (present classes: label, members,
    reason, shared_rank, tests) and ce (the ce setting compared against, or None).
    See :mod:`kdbench.results` for the statistics."""
    version = resolve_version(engine, suite, suite_version)
    if tasks is None:
        tasks = metric_tasks(engine, suite, version, metric)
    tasks = list(tasks)
    keys = tasks + ([AVERAGE] if len(tasks) > 1 else [])
    rank_by = AVERAGE if len(tasks) > 1 else (tasks[0] if tasks else None)
    lower = lower_is_better(metric)
    columns = ["setting", "role", "objective", "n_runs", "repeats"] + [stat_col(k, s) for k in keys for s in _STATS] \
        + ["rank", "tied_with_best", "p_vs_best", "delta_vs_best", "delta_vs_best_lo", "delta_vs_best_hi",
           "test_vs_best", "equiv_class", "vs_ce", "delta_vs_ce", "delta_vs_ce_lo", "delta_vs_ce_hi", "p_vs_ce",
           "band_recovered", "band_lo", "band_hi", *COST_COLUMNS, *SAMPLER_COST_COLUMNS]
    attrs = dict(suite=suite, suite_version=version, metric=metric, tasks=tasks, rank_by=rank_by,
                 lower_is_better=lower, score=None, classes=[], ce=None)
    long = leaderboard_long(engine, suite, metric, tasks, version)
    if long.empty:
        out = pd.DataFrame(columns=columns)
        out.attrs.update(attrs)
        return out

    g = group_label().label("grp")
    meta = frame(engine, select(g, Run.role, func.min(Run.objective), func.count(Run.id),
                                func.count(func.distinct(Run.seed)), func.avg(Run.wall_time_s),
                                func.avg(Run.train_tokens_per_s), func.avg(Run.peak_memory_mb))
                 .where(finished_in(suite, version)).group_by(g, Run.role),
                 ["setting", "role", "objective", "n_all", "n_seeds", *COST_COLUMNS])
    meta["repeats"] = (meta.pop("n_all") - meta.pop("n_seeds")).astype("int64")
    meta = meta.merge(_sampler_cost(engine, suite, version), on=["setting", "role"], how="left")
    rows = long.groupby(["setting", "role"], sort=False)["n_runs"].max().rename("n_runs").reset_index()
    df = rows.merge(meta, on=["setting", "role"], how="left")
    for k in keys:
        part = long[long.task == k].set_index(["setting", "role"])[_STATS]
        part.columns = [stat_col(k, s) for s in _STATS]
        df = df.merge(part, left_on=["setting", "role"], right_index=True, how="left")
        df[stat_col(k, "n")] = df[stat_col(k, "n")].astype("Int64")
    paired = PairedData(engine, suite, version, metric, tasks)
    if not paired.sides:
        paired = None
    classes = gradient_classes(engine, suite, set(df.setting[df.role == ROLE_DISTILLED]))
    present = _rank(df, rank_by, lower, paired, [t for t in tasks] if rank_by == AVERAGE else [rank_by], classes)
    df["tied_with_best"] = df["tied_with_best"].astype(bool)
    out = order_rows(df[columns], "rank")
    ce = out[(out.role == ROLE_DISTILLED) & (out.vs_ce == "ce")].setting
    attrs.update(score=paired.score if paired is not None else None, classes=present,
                 ce=str(ce.iloc[0]) if len(ce) else None)
    out.attrs.update(attrs)
    return out


def _sampler_cost(engine: Engine, suite: str, version: str) -> pd.DataFrame:
    """Per row, the mean of its finished runs' on-policy generation cost (NaN for a row whose runs
    sampled nothing: off-policy rows, or runs from before samplers)."""
    g = group_label().label("grp")
    rows = frame(engine, select(g, Run.role, Artifact.data).join(Artifact, Artifact.run_id == Run.id)
                 .where(finished_in(suite, version), Artifact.name == "cost"), ["setting", "role", "data"])
    out = pd.DataFrame({"setting": rows.setting, "role": rows.role})
    for col, key in zip(SAMPLER_COST_COLUMNS, ("sampler_generation_s", "sampler_generated_tokens_per_s",
                                               "teacher_scoring_s")):
        out[col] = [d.get(key) if isinstance(d, dict) and d.get("sampler_student_steps") else math.nan
                    for d in rows.data]
    return out.groupby(["setting", "role"], as_index=False)[list(SAMPLER_COST_COLUMNS)].mean()


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
    values = (select(group_label().label("grp"), Run.role, Run.seed.label("obs"), Metric.metric.label("key"),
                     Metric.seed.label("sseed"), Metric.value.label("value"))
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
