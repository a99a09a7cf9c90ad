"""One run: its summary over sampling seeds, per-seed metrics, every column, training curves, and pages of
its samples beside the teacher's response to the same prompt and seed."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from sqlalchemy import and_, func, literal, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from kdbench.results.leaderboard import stats_from_values
from kdbench.results.queries import FINISHED, as_dict, finished_in, frame, metric_order, resolve_version
from kdbench.store import ROLE_TEACHER, CurvePoint, Metric, Run, Sample


def run_summary(engine: Engine, run_id: int) -> pd.DataFrame:
    """Per (task, metric) of one run over its sampling seeds: mean, std, ci_lo, ci_hi (95 %, Student-t),
    n_seeds (1 for a seed-free metric, whose std and CI are then NaN)."""
    values = (select(literal("run").label("grp"), literal("run").label("role"), Metric.run_id.label("obs"),
                     (Metric.task + literal("\x1f") + Metric.metric).label("key"), Metric.seed.label("sseed"),
                     Metric.value.label("value"))
              .where(Metric.run_id == int(run_id)))
    st = stats_from_values(engine, values)
    cols = ["task", "metric", "mean", "std", "ci_lo", "ci_hi", "n_seeds"]
    if st.empty:
        return pd.DataFrame(columns=cols)
    st[["task", "metric"]] = st["key"].str.split("\x1f", n=1, expand=True)
    st = st.rename(columns={"n": "n_seeds"})[cols]
    st["n_seeds"] = st["n_seeds"].astype("int64")
    return st.sort_values(["task", "metric"], kind="stable").reset_index(drop=True)


def run_metrics(engine: Engine, run_id: int, wide: bool = True) -> pd.DataFrame:
    """The run's per-seed metric values: long (task, metric, seed, value) or wide (one column per seed,
    ``seed <n>``, and ``no seed`` for seed-free metrics)."""
    df = frame(engine, select(Metric.task, Metric.metric, Metric.seed, Metric.value)
               .where(Metric.run_id == int(run_id)).order_by(Metric.task, Metric.metric, Metric.seed))
    if not wide or df.empty:
        return df
    df["seed"] = df["seed"].map(lambda s: "no seed" if pd.isna(s) else f"seed {int(s)}")
    return df.pivot_table(index=["task", "metric"], columns="seed", values="value", aggfunc="mean").reset_index() \
        .rename_axis(columns=None)


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
            d[k] = as_dict(d.get(k))
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
    config = as_dict(r.config)
    fp = config.get("reference_fingerprint") if isinstance(config, dict) else None
    if fp is not None:
        for cid, cfg in cands:
            cfg = as_dict(cfg)
            if isinstance(cfg, dict) and cfg.get("reference_fingerprint") == fp:
                return int(cid)
    return int(cands[0][0])


def curves(engine: Engine, run_id: int) -> pd.DataFrame:
    """Training curve rows (step, split, loss, lr, tokens, elapsed_s) with the objective's terms expanded
    into one column each (``attrs["terms"]`` lists them), ordered by split and step."""
    df = frame(engine, select(CurvePoint.step, CurvePoint.split, CurvePoint.loss, CurvePoint.lr,
                              CurvePoint.tokens, CurvePoint.elapsed_s, CurvePoint.terms)
               .where(CurvePoint.run_id == int(run_id)).order_by(CurvePoint.split, CurvePoint.step))
    terms: list[str] = []
    if not df.empty:
        t = pd.json_normalize([_dict_or_empty(x) for x in df.pop("terms")])
        t = t.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
        terms = [c for c in t.columns if c not in df.columns]
        df = pd.concat([df, t[terms].set_axis(df.index)], axis=1)
    else:
        df = df.drop(columns=["terms"])
    df.attrs["terms"] = terms
    return df


def _dict_or_empty(v: Any) -> dict:
    d = as_dict(v)
    return d if isinstance(d, dict) else {}


def references(ref: Any) -> list[str]:
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
    version = resolve_version(engine, suite, suite_version)
    stmt = (select(Sample.scores).join(Run, Run.id == Sample.run_id)
            .where(finished_in(suite, version), Sample.task == task).limit(int(probe)))
    with engine.connect() as c:
        found = [as_dict(s) for s in c.execute(stmt).scalars()]
    return metric_order({k for s in found if isinstance(s, dict) for k in s})


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
    df = frame(engine, stmt, ["task", "prompt_id", "seed", "prompt", "output", "reference", "scores",
                              "teacher_output"])
    df["references"] = [references(r) for r in df.pop("reference")]
    df["scores"] = [_dict_or_empty(s) for s in df["scores"]]
    names = sorted({k for s in df["scores"] for k in s})
    for k in names:
        df[k] = [s.get(k) for s in df["scores"]]
    df.attrs["score_names"] = names
    df.attrs["teacher_run_id"] = teacher_id
    order = ["task", "prompt_id", "seed", "prompt", "output", "references", "teacher_output", *names, "scores"]
    return df[order]
