"""Two leaderboard rows (settings, reference roles or single runs) side by side: per-task deltas with the
paired-bootstrap interval (Welch where a metric has no per-sample scores), and the prompts where their
per-sample scores differ most."""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from kdbench.results.detail import references
from kdbench.results.leaderboard import leaderboard_long
from kdbench.results.paired import PairedData
from kdbench.results.queries import finished_in, frame, metric_tasks, resolve_version, selector_condition
from kdbench.results.stats import ALPHA, AVERAGE, lower_is_better, welch
from kdbench.store import Run, Sample

_COMPARE_COLUMNS = ["task", "mean_a", "ci95_a", "n_a", "mean_b", "ci95_b", "n_b", "delta", "delta_lo", "delta_hi",
                    "p_value", "better", "test", "n_prompts", "n_train_seeds"]


def compare(engine: Engine, suite: str, setting_a: str, setting_b: str, metric: str,
            tasks: Sequence[str] | None = None, suite_version: str | None = None) -> pd.DataFrame:
    """Per-task comparison of two leaderboard rows (a setting, ``teacher`` / ``student-init``, or
    ``run:<id>``): mean_a, ci95_a, n_a, mean_b, ci95_b, n_b (each side's leaderboard statistics), then the
    difference a − b: delta with its 95 % CI (delta_lo, delta_hi) and p_value from the **paired bootstrap**
    over prompts (and training seeds) of :func:`kdbench.results.paired.paired_difference` — test
    'paired bootstrap', n_prompts and n_train_seeds aligned — or, for a metric without per-sample scores or
    rows without aligned scores, from Welch's test on the per-seed values (test 'welch', counts 0);
    ``better`` is 'a', 'b' or '≈' (not separated at p < 0.05, or undefined), honouring the metric's
    direction. An ``average`` row (the mean over the tasks) follows when several tasks are compared."""
    version = resolve_version(engine, suite, suite_version)
    if tasks is None:
        tasks = metric_tasks(engine, suite, version, metric)
    tasks = list(tasks)
    sides = []
    for sel in (setting_a, setting_b):
        st = leaderboard_long(engine, suite, metric, tasks, version, row_filter=selector_condition(sel))
        # a run selector may span one group; a setting exactly one
        sides.append(st.groupby("task").first() if not st.empty else st.set_index("task"))
    a, b = sides
    keys = [k for k in tasks + [AVERAGE] if k in a.index and k in b.index]
    lower = lower_is_better(metric)
    paired = PairedData(engine, suite, version, metric, tasks, selectors=[setting_a, setting_b])
    out = []
    for k in keys:
        ra, rb = a.loc[k], b.loc[k]
        ma, mb = float(ra["mean"]), float(rb["mean"])
        r = paired.test(setting_a, setting_b, tasks if k == AVERAGE else [k])
        if r["defined"]:
            delta, lo, hi, p, test = r["mean"], r["lo"], r["hi"], r["p"], "paired bootstrap"
            n_prompts, n_seeds = r["n_prompts"], r["n_train_seeds"]
        else:
            delta = ma - mb
            p, half, _ = welch(ma, float(ra["std"]), float(ra["n"]), mb, float(rb["std"]), float(rb["n"]))
            lo, hi, test, n_prompts, n_seeds = delta - half, delta + half, "welch", 0, 0
        if math.isnan(p) or p >= ALPHA:
            better = "≈"
        else:
            better = "a" if (delta < 0) == lower else "b"
        out.append((k, ma, float(ra["ci95"]), int(ra["n"]), mb, float(rb["ci95"]), int(rb["n"]), delta,
                    lo, hi, p, better, test, n_prompts, n_seeds))
    df = pd.DataFrame(out, columns=_COMPARE_COLUMNS)
    df.attrs.update(dict(suite=suite, suite_version=version, metric=metric, a=setting_a, b=setting_b,
                         lower_is_better=lower, score=paired.score))
    return df


def _run_ids(suite: str, version: str | None, sel: str):
    return select(Run.id).where(finished_in(suite, version), selector_condition(sel))


def prompts_differing_most(engine: Engine, suite: str, setting_a: str, setting_b: str, task: str,
                           metric: str = "rougeL", limit: int = 10, suite_version: str | None = None) -> pd.DataFrame:
    """Prompts whose per-prompt score (``samples.scores[metric]``, averaged in SQL over every sampling
    seed and run of the row) differs most between a and b: prompt_id, prompt, references, score_a,
    score_b, diff (a - b), n_a, n_b, output_a, output_b (each side's first sample: lowest run id,
    then lowest seed), seed_a, seed_b. Ordered by |diff| descending, then prompt_id."""
    version = resolve_version(engine, suite, suite_version)
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
    top = frame(engine, stmt, ["prompt_id", "score_a", "score_b", "diff", "n_a", "n_b", "id_a", "id_b"])
    cols = ["prompt_id", "prompt", "references", "score_a", "score_b", "diff", "n_a", "n_b", "output_a",
            "output_b", "seed_a", "seed_b"]
    if top.empty:
        return pd.DataFrame(columns=cols)
    ids = [int(i) for i in pd.concat([top.id_a, top.id_b])]
    with engine.connect() as c:
        rows = {r.id: r for r in c.execute(select(Sample.id, Sample.prompt, Sample.output, Sample.reference,
                                                  Sample.seed).where(Sample.id.in_(ids)))}
    first_a = [rows[int(i)] for i in top.id_a]
    first_b = [rows[int(i)] for i in top.id_b]
    top["prompt"] = [r.prompt for r in first_a]
    top["references"] = [references(r.reference) for r in first_a]
    top["output_a"] = [r.output for r in first_a]
    top["output_b"] = [r.output for r in first_b]
    top["seed_a"] = [r.seed for r in first_a]
    top["seed_b"] = [r.seed for r in first_b]
    return top[cols].reset_index(drop=True)
