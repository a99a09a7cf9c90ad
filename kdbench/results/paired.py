"""Paired comparisons on per-sample scores, repeats of one experiment, and the suite's resolution.

Every objective of a suite version is evaluated on the *same prompts* with the *same sampling seeds*, so
two leaderboard rows can be compared prompt by prompt: the per-prompt paired differences are far less
noisy than two independent intervals. This module loads the per-sample scores (``samples.scores``) of a
suite version, averages repeats, aligns two rows and runs the paired bootstrap of
:func:`kdbench.metrics.stats.paired_bootstrap` (definitions there and in docs/statistics.md).

* **Observation**: one per (row, training seed). Runs of one setting, suite version and training seed
  are repeats of one experiment: their scores are averaged per (task, prompt, sampling seed) into that
  one observation, never pooled as extra samples. Reference rows (teacher, student-init) and single
  runs (``run:<id>``) are *unseeded*: all their runs are averaged into one observation, which is paired
  with every training seed of the other side.
* **Alignment**: per task, cells (training seed, prompt_id, sampling seed) present on both sides;
  training seeds of two distilled settings are paired by value (seeds only one side has are left out).
* **Metric -> per-sample score**: ``rougeL``, ``accuracy``, ``teacher_logprob`` are stored per sample
  under their own names, ``mean_length`` as ``length``, ``degenerate_frac`` as ``degenerate`` (and the
  ``_sampled`` variants alike). Corpus-level metrics (Self-BLEU, distinct-n, token KLs) have no
  per-sample score: no paired test (the leaderboard falls back to Welch for them).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from sqlalchemy import func, literal, select
from sqlalchemy.engine import Engine

from kdbench.metrics.stats import paired_bootstrap, paired_ratio_bootstrap, resolution as pooled_resolution
from kdbench.results.queries import (
    FINISHED,
    REFERENCE_ROLES,
    experiment_key,
    fingerprint_col,
    finished_in,
    frame,
    group_label,
    metric_tasks,
    resolve_version,
    selector_condition,
)
from kdbench.results.stats import ALPHA, lower_is_better
from kdbench.store import ROLE_DISTILLED, ROLE_STUDENT_INIT, ROLE_TEACHER, Run, Sample

N_BOOT = 2000  # replicates of a paired test
N_BOOT_RESOLUTION = 1000  # replicates per pair when pooling the suite's resolution
BOOT_SEED = 0  # every comparison draws with numpy.random.default_rng(0): results are reproducible
_NO_SEED = -(2 ** 31)  # stands for a NULL sampling seed (greedy decodes)
_SCORE_OF_METRIC = {"mean_length": "length", "degenerate_frac": "degenerate"}


def score_key(metric: str) -> str:
    """The per-sample score (key of ``samples.scores``) whose mean over prompts is ``metric``."""
    base, suffix = (metric[: -len("_sampled")], "_sampled") if metric.endswith("_sampled") else (metric, "")
    return _SCORE_OF_METRIC.get(base, base) + suffix


# ---------------------------------------------------------------------------- repeats


def repeats_of(engine: Engine, run_id: int) -> list[int]:
    """Finished runs of the same experiment as ``run_id`` (the run itself included when finished), by id."""
    cols = [Run.id, Run.config_hash, Run.role, Run.setting, Run.suite, Run.suite_version, Run.seed, Run.status,
            fingerprint_col().label("fp")]
    with engine.connect() as c:
        me = c.execute(select(*cols).where(Run.id == int(run_id))).first()
        if me is None:
            return []
        same = c.execute(select(*cols).where(Run.suite == me.suite, Run.suite_version == me.suite_version,
                                             Run.status == FINISHED)).all()
    key = experiment_key(me.config_hash, me.role, me.setting, me.suite, me.suite_version, me.seed, me.fp)
    return sorted(int(r.id) for r in same
                  if experiment_key(r.config_hash, r.role, r.setting, r.suite, r.suite_version, r.seed, r.fp) == key)


# ---------------------------------------------------------------------------- loading and alignment


@dataclass
class Side:
    """One leaderboard row's per-sample scores: per task an array [training seeds, prompts, sampling seeds]
    on the task's shared prompt / sampling-seed index (NaN = no score)."""

    name: str
    role: str
    seeded: bool
    seeds: list = field(default_factory=list)
    arrays: dict = field(default_factory=dict)


class PairedData:
    """The per-sample scores of a suite version for one metric and some tasks, loaded once (one SQL query
    per selector, averaged over repeat runs in the database), aligned on request.

    ``selectors`` None loads every leaderboard row (labelled like the leaderboard: the setting, or the
    role of a reference row); otherwise each selector (a setting, ``teacher`` / ``student-init`` or
    ``run:<id>``) is loaded under its own name."""

    def __init__(self, engine: Engine, suite: str, suite_version: str | None, metric: str,
                 tasks: Sequence[str] | None = None, selectors: Sequence[str] | None = None):
        self.suite, self.metric = suite, metric
        self.version = resolve_version(engine, suite, suite_version)
        self.score = score_key(metric)
        self.tasks = list(tasks) if tasks is not None else metric_tasks(engine, suite, self.version, metric)
        score = Sample.scores[self.score].as_float()
        parts = []
        for sel in ([None] if selectors is None else list(selectors)):
            # grouped by the labels, not by the expressions again: a repeated expression binds its
            # literals anew, and PostgreSQL does not take coalesce(seed, $2) for coalesce(seed, $1)
            grp = (group_label() if sel is None else literal(sel)).label("grp")
            sseed = func.coalesce(Sample.seed, _NO_SEED).label("sseed")
            cond = finished_in(self.suite, self.version)
            stmt = (select(grp, Run.role, Run.seed.label("tseed"), Sample.task, Sample.prompt_id,
                           sseed, func.avg(score).label("value"))
                    .join(Run, Run.id == Sample.run_id)
                    .where(cond, Sample.task.in_(self.tasks), score.is_not(None)))
            if sel is not None:
                stmt = stmt.where(selector_condition(sel))
            stmt = stmt.group_by(grp, Run.role, Run.seed, Sample.task, Sample.prompt_id, sseed)
            df = frame(engine, stmt, ["grp", "role", "tseed", "task", "prompt_id", "sseed", "value"])
            if sel is not None and not df.empty:
                unseeded = sel.startswith("run:") or sel in REFERENCE_ROLES
                df["seeded"] = not unseeded and (df.role == ROLE_DISTILLED).all()
            parts.append(df)
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        self.sides: dict[str, Side] = {}
        if df.empty:
            return
        df = df.astype({"value": "float64"})
        if "seeded" not in df:
            df["seeded"] = df.role == ROLE_DISTILLED
        df["seeded"] = df["seeded"].fillna(False).astype(bool)
        seeds_of = {g: sorted(v.tolist()) for g, v in df.groupby("grp", sort=False)["tseed"].unique().items()}
        for task, t in df.groupby("task", sort=False):
            p_code, _ = pd.factorize(t.prompt_id, sort=True)
            k_code, _ = pd.factorize(t.sseed, sort=True)
            n_p, n_k = int(p_code.max()) + 1, int(k_code.max()) + 1
            t = t.assign(p=p_code, k=k_code)
            for (grp, role), g in t.groupby(["grp", "role"], sort=False):
                side = self.sides.get(grp)
                seeded = bool(g.seeded.iloc[0])
                if side is None:
                    seeds = seeds_of[grp] if seeded else [None]
                    side = self.sides[grp] = Side(str(grp), str(role), seeded, seeds)
                if not seeded:  # one observation: the mean over every run of the row
                    g = g.groupby(["p", "k"], as_index=False)["value"].mean().assign(s=0)
                else:
                    g = g.assign(s=g.tseed.map({s: i for i, s in enumerate(side.seeds)}))
                arr = np.full((len(side.seeds), n_p, n_k), np.nan)
                arr[g.s.to_numpy(int), g.p.to_numpy(int), g.k.to_numpy(int)] = g.value.to_numpy()
                side.arrays[task] = arr

    def has(self, name: str) -> bool:
        return name in self.sides

    def differences(self, a: str, b: str, tasks: Sequence[str] | None = None) -> tuple[list[np.ndarray], list, list]:
        """Aligned differences a - b: (strata [S, P, K] per task both sides have, training seeds, tasks)."""
        sa, sb = self.sides.get(a), self.sides.get(b)
        if sa is None or sb is None:
            return [], [], []
        tasks = [t for t in (tasks or self.tasks) if t in sa.arrays and t in sb.arrays]
        if sa.seeded and sb.seeded:
            seeds = [s for s in sa.seeds if s in set(sb.seeds)]
            ia, ib = [sa.seeds.index(s) for s in seeds], [sb.seeds.index(s) for s in seeds]
        elif sa.seeded:
            seeds, ia, ib = list(sa.seeds), list(range(len(sa.seeds))), [0] * len(sa.seeds)
        elif sb.seeded:
            seeds, ia, ib = list(sb.seeds), [0] * len(sb.seeds), list(range(len(sb.seeds)))
        else:
            seeds, ia, ib = [None], [0], [0]
        if not seeds:
            return [], [], tasks
        strata = [sa.arrays[t][ia] - sb.arrays[t][ib] for t in tasks]
        keep = [i for i, d in enumerate(strata) if (~np.isnan(d)).any()]
        return [strata[i] for i in keep], seeds, [tasks[i] for i in keep]

    def test(self, a: str, b: str, tasks: Sequence[str] | None = None, n_boot: int = N_BOOT,
             alpha: float = ALPHA) -> dict:
        """Paired bootstrap of a - b (see :func:`paired_difference` for the keys)."""
        strata, seeds, used = self.differences(a, b, tasks)
        out = dict(a=a, b=b, metric=self.metric, score=self.score, tasks=used,
                   train_seeds=[s for s in seeds if s is not None], test="paired bootstrap")
        if not strata:
            why = ("no common training seed" if used and not seeds else "no aligned per-sample scores")
            out.update(mean=math.nan, lo=math.nan, hi=math.nan, p=math.nan, se=math.nan, separated=False,
                       n_prompts=0, n_train_seeds=0, n_cells=0, n_boot=n_boot, better="≈", defined=False,
                       reason=why)
            return out
        r = paired_bootstrap(strata, n_boot=n_boot, alpha=alpha, seed=BOOT_SEED)
        out.update(r)
        out["defined"] = not math.isnan(r["p"])
        out["reason"] = "" if out["defined"] else "fewer than two aligned prompts"
        if r["separated"]:
            out["better"] = "a" if (r["mean"] < 0) == lower_is_better(self.metric) else "b"
        else:
            out["better"] = "≈"
        return out

    def band(self, a: str, tasks: Sequence[str] | None = None, n_boot: int = N_BOOT, alpha: float = ALPHA) -> dict:
        """Share of the teacher - undistilled band that row ``a`` recovers, in %: ``100 · Δ(a − student-init)
        / Δ(teacher − student-init)``, both paired on the cells where a, teacher and student-init all have
        scores, with a CI from shared bootstrap draws. NaN without both reference rows."""
        nan = dict(mean=math.nan, lo=math.nan, hi=math.nan, n_prompts=0, n_train_seeds=0, n_boot=n_boot)
        if not (self.has(ROLE_TEACHER) and self.has(ROLE_STUDENT_INIT) and self.has(a)):
            return nan
        num, seeds, used = self.differences(a, ROLE_STUDENT_INIT, tasks)
        den_all, _, den_tasks = self.differences(ROLE_TEACHER, ROLE_STUDENT_INIT, used)
        if not num or den_tasks != used:
            return nan
        den = [np.broadcast_to(d, n.shape).copy() for d, n in zip(den_all, num)]
        return paired_ratio_bootstrap(num, den, n_boot=n_boot, alpha=alpha, seed=BOOT_SEED, scale=100.0)

    def resolution(self, tasks: Sequence[str] | None = None, n_boot: int = N_BOOT_RESOLUTION,
                   alpha: float = ALPHA) -> dict:
        """The smallest difference the suite resolves (:func:`resolution`) from the rows loaded."""
        distilled = [n for n, s in self.sides.items() if s.role == ROLE_DISTILLED]
        basis = "pairs of distilled settings"
        pairs = list(itertools.combinations(sorted(distilled), 2))
        if not pairs:
            basis = "pairs of rows (fewer than two distilled settings)"
            pairs = list(itertools.combinations(sorted(self.sides), 2))
        ses, rows = [], []
        for a, b in pairs:
            strata, seeds, _ = self.differences(a, b, tasks)
            if not strata:
                continue
            r = paired_bootstrap(strata, n_boot=n_boot, alpha=alpha, seed=BOOT_SEED)
            if math.isfinite(r["se"]):
                ses.append(r["se"])
                rows.append((a, b, r["se"], r["n_prompts"], r["n_train_seeds"]))
        value = pooled_resolution(ses, alpha)
        per_pair = pd.DataFrame(rows, columns=["a", "b", "se", "n_prompts", "n_train_seeds"])
        return dict(value=value, se=value / 1.959963984540054 if math.isfinite(value) else math.nan,
                    n_pairs=len(ses), basis=basis, metric=self.metric, score=self.score,
                    tasks=list(tasks or self.tasks), suite=self.suite, suite_version=self.version,
                    n_prompts=int(per_pair.n_prompts.median()) if len(per_pair) else 0,
                    n_train_seeds=int(per_pair.n_train_seeds.max()) if len(per_pair) else 0,
                    pairs=per_pair)


def _tasks_arg(task) -> list[str] | None:
    if task is None:
        return None
    return [task] if isinstance(task, str) else list(task)


def paired_difference(engine: Engine, suite: str, version: str | None, setting_a: str, setting_b: str,
                      task: str | Sequence[str] | None, metric: str, *, n_boot: int = N_BOOT,
                      alpha: float = ALPHA) -> dict:
    """Paired difference ``a − b`` of two leaderboard rows (a setting, ``teacher`` / ``student-init``, or
    ``run:<id>``) on one task (or the mean over several tasks; None: every task with the metric) of one
    suite version (None: the default version), from the per-sample scores.

    Returns a dict: mean (Δ), lo, hi (95 % percentile CI), p (two-sided bootstrap p), se (bootstrap),
    separated (p < alpha), better ('a', 'b' or '≈', honouring the metric's direction), n_prompts,
    n_train_seeds, n_cells, train_seeds, tasks, n_boot, defined (False: no aligned scores, no common
    training seed, a metric without per-sample scores, or < 2 prompts; then reason says why), a, b,
    metric, score (the per-sample score used), test."""
    data = PairedData(engine, suite, version, metric, _tasks_arg(task), selectors=[setting_a, setting_b])
    return data.test(setting_a, setting_b, n_boot=n_boot, alpha=alpha)


def band_recovered(engine: Engine, suite: str, version: str | None, setting: str,
                   task: str | Sequence[str] | None, metric: str, *, n_boot: int = N_BOOT) -> dict:
    """``100 · Δ(setting − student-init) / Δ(teacher − student-init)`` on the aligned cells, with its paired
    95 % CI (mean, lo, hi, n_prompts, n_train_seeds); 100 = the teacher, 0 = the undistilled student."""
    data = PairedData(engine, suite, version, metric, _tasks_arg(task),
                      selectors=[setting, ROLE_TEACHER, ROLE_STUDENT_INIT])
    return data.band(setting, n_boot=n_boot)


def resolution(engine: Engine, suite: str, version: str | None, task: str | Sequence[str] | None,
               metric: str, *, n_boot: int = N_BOOT_RESOLUTION, alpha: float = ALPHA) -> dict:
    """The smallest difference the suite version can resolve for a metric on a task (or the mean over
    tasks):

        resolution = z(0.975) · sqrt( mean over pairs (A, B) of SE(A − B)^2 )

    over every pair of distilled settings with aligned per-sample scores (every pair of rows, references
    included, when there are fewer than two distilled settings), SE = the std of the pair's paired
    bootstrap replicates (``n_boot`` each, seed 0). Paired differences smaller than this are not
    separated at the 5 % level (a true difference of this size is detected half the time).

    Returns value, se (pooled), n_pairs, basis, metric, score, tasks, suite, suite_version, n_prompts
    (median over pairs), n_train_seeds (max over pairs), pairs (DataFrame a, b, se, n_prompts,
    n_train_seeds). value is NaN when no pair has a defined test."""
    data = PairedData(engine, suite, version, metric, _tasks_arg(task))
    return data.resolution(n_boot=n_boot, alpha=alpha)


def describe_difference(r: dict, decimals: int = 2) -> str:
    """``-0.25 [-0.98, +0.49], p 0.49 (paired, 20 prompts × 2 training seeds)`` for a paired test result (``p ≤
    0.001`` at the floor 2/(B+1) of the bootstrap p)."""
    if not r.get("defined", True) or math.isnan(r.get("mean", math.nan)):
        return f"no paired test ({r.get('reason') or 'undefined'})"
    f = f"{{:+.{decimals}f}}"
    seeds = r.get("n_train_seeds", 0)
    floor = 2.0 / (r.get("n_boot", N_BOOT) + 1)
    p = f"p ≤ {floor:.2g}" if r["p"] <= floor * (1 + 1e-9) else f"p {r['p']:.3g}"
    return (f"{f.format(r['mean'])} [{f.format(r['lo'])}, {f.format(r['hi'])}], {p} "
            f"(paired, {r['n_prompts']} prompts × {seeds} training seed{'s' if seeds != 1 else ''})")

