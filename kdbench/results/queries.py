"""Store state, the shared SQL building blocks (row labels, filters) and the catalogue listings that feed
the app's selectors: suites and their versions, tasks, metrics, settings, runs, failed runs, analyses."""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Sequence

import pandas as pd
from sqlalchemy import and_, case, func, inspect, literal, select
from sqlalchemy.engine import Engine

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
from kdbench.suites.spec import HEADLINE

REFERENCE_ROLES = (ROLE_TEACHER, ROLE_STUDENT_INIT)
LEADERBOARD_ROLES = (*REFERENCE_ROLES, ROLE_DISTILLED)
FINISHED = "finished"
FAILED = "failed"
# Headline metrics listed first in selectors; every metric found in the store is listed.
PREFERRED_METRICS = ("rougeL", "accuracy")
_RUN_SELECTOR = re.compile(r"^run:(\d+)$")


# ---------------------------------------------------------------------------- helpers


def frame(engine: Engine, stmt, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Run a select and return its rows as a DataFrame."""
    with engine.connect() as c:
        res = c.execute(stmt)
        rows = res.fetchall()
        cols = list(columns) if columns is not None else list(res.keys())
    return pd.DataFrame([tuple(r) for r in rows], columns=cols)


def as_dict(v: Any) -> Any:
    """A JSON column's value, decoded when the driver returned text; ``{}`` for NULL."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v if v is not None else {}


def metric_order(names: Iterable[str]) -> list[str]:
    """Headline metrics first (:data:`PREFERRED_METRICS`), then the rest alphabetically."""
    return sorted(names, key=lambda m: (PREFERRED_METRICS.index(m) if m in PREFERRED_METRICS
                                        else len(PREFERRED_METRICS), m.lower()))


def is_quick_version(version: str | None) -> bool:
    """True for the label of a run with a non-standard budget (``1+steps=3,eval_limit=3``)."""
    return version is not None and "+" in str(version)


def version_label(version: str) -> str:
    """How a suite version reads in a selector: ``1 (standard)`` or ``1+steps=3,eval_limit=3 (quick)``."""
    return f"{version} (quick)" if is_quick_version(version) else f"{version} (standard)"


def group_label():
    """SQL label of a leaderboard row: the setting for distilled runs, the role for reference rows."""
    return case((Run.role == ROLE_DISTILLED, func.coalesce(Run.setting, Run.objective, "unnamed")),
                else_=Run.role)


# ---------------------------------------------------------------------------- teacher groups
#
# Reference rows and distilled runs record the *reference fingerprint* of the teacher they were made
# with (``runs.config["reference_fingerprint"]``: teacher weights by content, student construction, data,
# protocol). One suite version can hold runs under several teachers: the same suite fine-tunes its
# teacher differently on another machine kind (bf16 where native, other kernels), or a team store
# gathers several machines. Numbers made under different teachers are never compared: where a suite
# version holds finished runs under more than one fingerprint, each is its own *group*, written
# ``VERSION@FP`` (the first FP_CHARS characters), and every listing and query below takes such a
# version wherever it takes a version. A version with one teacher stays plain (``2``).

FP_SEP = "@"
FP_CHARS = 8


def fingerprint_col():
    """SQL expression of a run's reference fingerprint (NULL where it records none)."""
    return Run.config["reference_fingerprint"].as_string()


def split_version(version: str | None) -> tuple[str | None, str | None]:
    """``"2@7ae36e2a"`` → ``("2", "7ae36e2a")``; ``"2"`` → ``("2", None)``."""
    if version is None or FP_SEP not in str(version):
        return version, None
    v, _, fp = str(version).rpartition(FP_SEP)
    return v, fp


def version_condition(version: str | None):
    """Runs of a (possibly teacher-qualified) suite version."""
    v, fp = split_version(version)
    cond = Run.suite_version == v
    if fp is not None:
        cond = and_(cond, func.substr(fingerprint_col(), 1, len(fp)) == fp)
    return cond


def finished_in(suite: str, version: str | None, roles: Iterable[str] = LEADERBOARD_ROLES):
    """Finished runs of a suite version (or teacher group ``VERSION@FP``) with one of the roles."""
    return and_(Run.suite == suite, version_condition(version), Run.status == FINISHED, Run.role.in_(list(roles)))


def _split_versions(engine: Engine) -> set[tuple[str, str]]:
    """(suite, suite_version) pairs whose finished leaderboard runs record more than one fingerprint."""
    fp = fingerprint_col()
    stmt = (select(Run.suite, Run.suite_version).where(Run.status == FINISHED, Run.role.in_(list(LEADERBOARD_ROLES)),
                                                       fp.is_not(None))
            .group_by(Run.suite, Run.suite_version).having(func.count(func.distinct(fp)) > 1))
    with engine.connect() as c:
        return {(a, b) for a, b in c.execute(stmt)}


def qualify(split: set, suite, suite_version, fingerprint) -> str:
    """The version a run is listed under: ``VERSION@FP`` in a split version, else the stored version."""
    if (suite, suite_version) in split and isinstance(fingerprint, str) and fingerprint:
        return f"{suite_version}{FP_SEP}{fingerprint[:FP_CHARS]}"
    return suite_version


def run_version(engine: Engine, run_id: int) -> str | None:
    """The (teacher-qualified) version of one run: what to pass to the listings to see its group."""
    with engine.connect() as c:
        r = c.execute(select(Run.suite, Run.suite_version, fingerprint_col()).where(Run.id == int(run_id))).first()
    return None if r is None else qualify(_split_versions(engine), *r)


def selector_condition(sel: str):
    """A row selector: a setting label, a reference role name, or ``run:<id>`` for one run."""
    m = _RUN_SELECTOR.match(str(sel))
    if m:
        return Run.id == int(m.group(1))
    if sel in REFERENCE_ROLES:
        return Run.role == sel
    return and_(Run.role == ROLE_DISTILLED, func.coalesce(Run.setting, Run.objective, "unnamed") == sel)


def order_rows(df: pd.DataFrame, rank_col: str | None = None) -> pd.DataFrame:
    """Reference rows first (teacher, student-init), then distilled rows by rank, then by name."""
    if df.empty:
        return df
    role_order = {ROLE_TEACHER: 0, ROLE_STUDENT_INIT: 1}
    key = df["role"].map(lambda r: role_order.get(r, 2))
    sort = pd.DataFrame({"k": key, "r": df[rank_col] if rank_col else 0, "s": df["setting"]})
    sort["r"] = pd.to_numeric(sort["r"], errors="coerce").fillna(10**9)
    return df.loc[sort.sort_values(["k", "r", "s"], kind="stable").index].reset_index(drop=True)


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


# ---------------------------------------------------------------------------- listings


def list_suites(engine: Engine) -> pd.DataFrame:
    """One row per (suite, suite_version) — per teacher group ``VERSION@FP`` where a version holds runs
    under several teachers (see above) — with run counts and ``quick`` (a non-standard budget). Within a
    suite: standard versions first, then quick-run versions, each newest activity first — so the first
    row of a suite is the version :func:`default_version` picks when it has finished runs. In a split
    version, runs that record no fingerprint (analyses) are not counted in any group."""
    fp = fingerprint_col().label("fp")
    stmt = (select(Run.suite, Run.suite_version, fp,
                   func.count(case((Run.status == FINISHED, 1))).label("n_finished"),
                   func.count(case((Run.status == FAILED, 1))).label("n_failed"),
                   func.count(case((Run.status == "running", 1))).label("n_running"),
                   func.max(Run.id).label("last_run_id"))
            .group_by(Run.suite, Run.suite_version, fp))
    raw = frame(engine, stmt)
    split = _split_versions(engine)
    raw = raw[[(a, b) not in split or isinstance(f, str) for a, b, f in zip(raw.suite, raw.suite_version, raw.fp)]]
    raw = raw.assign(suite_version=[qualify(split, a, b, f) for a, b, f in zip(raw.suite, raw.suite_version, raw.fp)])
    df = (raw.groupby(["suite", "suite_version"], as_index=False, sort=False)
          .agg(n_finished=("n_finished", "sum"), n_failed=("n_failed", "sum"), n_running=("n_running", "sum"),
               last_run_id=("last_run_id", "max")))
    df["quick"] = [is_quick_version(v) for v in df.suite_version]
    return df.sort_values(["suite", "quick", "last_run_id"], ascending=[True, True, False],
                          kind="stable").reset_index(drop=True)


def default_version(engine: Engine, suite: str) -> str | None:
    """The version a suite is shown in by default: the standard version (no ``+overrides``) of the most
    recent finished run; without one, the version of the most recent finished run, else of the most
    recent run; None for an unknown suite. In a version split by teacher: the group of that run."""
    with engine.connect() as c:
        for cond in (and_(Run.status == FINISHED, ~Run.suite_version.contains("+")), Run.status == FINISHED,
                     literal(True)):
            v = c.execute(select(Run.suite_version).where(Run.suite == suite, cond)
                          .order_by(Run.id.desc()).limit(1)).scalar()
            if v is not None:
                break
        else:
            return None
        split = _split_versions(engine)
        if (suite, v) not in split:
            return v
        fp = c.execute(select(fingerprint_col()).where(finished_in(suite, v), fingerprint_col().is_not(None))
                       .order_by(Run.id.desc()).limit(1)).scalar()  # the newest teacher's group
    return qualify(split, suite, v, fp)


def resolve_version(engine: Engine, suite: str, suite_version: str | None) -> str | None:
    return suite_version if suite_version is not None else default_version(engine, suite)


def list_tasks(engine: Engine, suite: str, suite_version: str | None = None, metric: str | None = None) -> list[str]:
    """Tasks with metrics from finished runs of the suite (optionally only those having ``metric``)."""
    version = resolve_version(engine, suite, suite_version)
    stmt = select(Metric.task).join(Run, Run.id == Metric.run_id).where(finished_in(suite, version))
    if metric is not None:
        stmt = stmt.where(Metric.metric == metric)
    with engine.connect() as c:
        return list(c.execute(stmt.distinct().order_by(Metric.task)).scalars())


def metric_tasks(engine: Engine, suite: str, suite_version: str | None, metric: str) -> list[str]:
    """The tasks a metric is read on when none are named: those it is the headline of, else those of
    the first task's kind, else (no suite spec stored) all that have it. micro v3's ROUGE-L is its open
    task's, not an average with the trivia task, whose headline is accuracy."""
    version = resolve_version(engine, suite, suite_version)
    tasks = list_tasks(engine, suite, version, metric=metric)
    stmt = select(Run.config).where(finished_in(suite, version)).order_by(Run.id.desc()).limit(1)
    with engine.connect() as c:
        config = c.execute(stmt).scalar() or {}
    spec = config.get("suite") if isinstance(config, dict) else None  # the resolved SuiteSpec, as a dict
    specs = (spec.get("tasks") or []) if isinstance(spec, dict) else []
    kinds = {t["name"]: t.get("kind", "open") for t in specs if isinstance(t, dict) and "name" in t}
    heads = [t for t in tasks if HEADLINE.get(kinds.get(t)) == metric]
    if heads or not kinds:
        return heads or tasks
    first = kinds[next(iter(kinds))]
    return [t for t in tasks if kinds.get(t) == first] or tasks


def list_metrics(engine: Engine, suite: str, task: str | None = None, suite_version: str | None = None) -> list[str]:
    """Metric names found in the store for the suite (and task); headline metrics first."""
    version = resolve_version(engine, suite, suite_version)
    stmt = select(Metric.metric).join(Run, Run.id == Metric.run_id).where(finished_in(suite, version))
    if task is not None:
        stmt = stmt.where(Metric.task == task)
    with engine.connect() as c:
        return metric_order(c.execute(stmt.distinct()).scalars())


def list_settings(engine: Engine, suite: str, suite_version: str | None = None) -> pd.DataFrame:
    """Leaderboard rows available (finished runs): setting label, role, objective, n_runs (distinct training
    seeds: repeats of one seed count once), repeats (finished runs beyond one per training seed)."""
    version = resolve_version(engine, suite, suite_version)
    g = group_label().label("setting")
    stmt = (select(g, Run.role, func.min(Run.objective).label("objective"),
                   func.count(func.distinct(Run.seed)).label("n_runs"), func.count(Run.id).label("n_all"))
            .where(finished_in(suite, version)).group_by(g, Run.role).order_by(Run.role.desc(), g))
    df = frame(engine, stmt)
    df["repeats"] = (df.pop("n_all") - df.n_runs).astype("int64")
    return order_rows(df)


def list_runs(engine: Engine, suite: str | None = None, status: str | None = None,
              roles: Iterable[str] | None = None) -> pd.DataFrame:
    """Runs (newest first) for pickers: id, role, setting, objective, suite, version, seed, status, ...,
    config_hash, and ``repeats``: the number of finished runs of the same experiment (same config_hash;
    where it is NULL, same row label, suite, suite version and training seed), 0 where none finished."""
    cols = [Run.id.label("run_id"), Run.role, Run.setting, Run.objective, Run.suite, Run.suite_version,
            Run.seed, Run.status, Run.created_at, Run.finished_at, Run.wall_time_s, Run.error, Run.config_hash,
            fingerprint_col().label("reference_fingerprint")]
    stmt = select(*cols)
    if suite is not None:
        stmt = stmt.where(Run.suite == suite)
    if status is not None:
        stmt = stmt.where(Run.status == status)
    if roles is not None:
        stmt = stmt.where(Run.role.in_(list(roles)))
    df = frame(engine, stmt.order_by(Run.id.desc()))
    keys = ["config_hash", "role", "setting", "suite", "suite_version", "seed", "reference_fingerprint"]
    fin = frame(engine, select(*[getattr(Run, k) for k in keys[:-1]], fingerprint_col())
                .where(Run.status == FINISHED), keys)
    count: dict[str, int] = {}
    for r in fin.itertuples(index=False):
        k = experiment_key(*r)
        count[k] = count.get(k, 0) + 1
    df["repeats"] = [count.get(experiment_key(*r), 0) for r in df[keys].itertuples(index=False)]
    split = _split_versions(engine)
    df["suite_version"] = [qualify(split, a, b, f) for a, b, f in
                           zip(df.suite, df.suite_version, df.reference_fingerprint)]
    return df


def experiment_key(config_hash, role, setting, suite, suite_version, seed, fingerprint=None) -> str:
    """Identity of an experiment: ``runs.config_hash``; where it is NULL (older rows) the row label
    (setting, or the role of a reference row), suite, suite version and training seed — and in both cases
    the reference fingerprint where the run records one (the same configuration under another teacher is
    another experiment). Finished runs with one key are repeats of one experiment."""
    teacher = f"|fp:{fingerprint}" if isinstance(fingerprint, str) and fingerprint else ""
    if isinstance(config_hash, str) and config_hash:
        return f"hash:{config_hash}{teacher}"
    label = setting if role == ROLE_DISTILLED and isinstance(setting, str) else role
    return f"row:{label}|{suite}|{suite_version}|{seed}{teacher}"


def failed_runs(engine: Engine, suite: str | None = None, suite_version: str | None = None) -> pd.DataFrame:
    """Failed runs with their reasons (newest first)."""
    stmt = select(Run.id.label("run_id"), Run.role, Run.setting, Run.suite, Run.suite_version, Run.seed,
                  Run.error, Run.created_at, Run.finished_at).where(Run.status == FAILED)
    if suite is not None:
        stmt = stmt.where(Run.suite == suite)
    if suite_version is not None:
        stmt = stmt.where(version_condition(suite_version))
    return frame(engine, stmt.order_by(Run.id.desc()))


def status_counts(engine: Engine, suite: str | None = None, suite_version: str | None = None) -> dict[str, int]:
    stmt = select(Run.status, func.count(Run.id)).group_by(Run.status)
    if suite is not None:
        stmt = stmt.where(Run.suite == suite)
    if suite_version is not None:
        stmt = stmt.where(version_condition(suite_version))
    with engine.connect() as c:
        return {s: int(n) for s, n in c.execute(stmt)}


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
    data = as_dict(row.data)
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
