"""End to end: `kdbench run` distils the real teacher into the real student, evaluates and
records. One tiny run (few steps, few prompts) is shared by the tests of this module."""

from __future__ import annotations

import json
import textwrap

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kdbench.cli import main
from kdbench.store import CurvePoint, Metric, Run, Sample, open_engine

STEPS, PROMPTS, SEEDS = 3, 3, 3
TINY = ["--steps", str(STEPS), "--eval-limit", str(PROMPTS), "--no-save", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    db = tmp_path_factory.mktemp("e2e") / "runs.db"
    assert main(["run", "--objective", "csd", "--param", "tau=1.5", "--db", str(db), *TINY]) == 0
    return db


def rows(db, model, **where):
    with Session(open_engine(str(db))) as s:
        q = select(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return list(s.scalars(q))


def test_run_writes_reference_rows_and_the_distilled_run(store):
    runs = {r.role: r for r in rows(store, Run)}
    assert set(runs) == {"teacher", "student-init", "distilled"}
    assert all(r.status == "finished" for r in runs.values())
    run = runs["distilled"]
    assert run.objective == "csd" and run.params["tau"] == 1.5
    assert run.setting == "csd(alpha=0.15,tau=1.5,w1=S,w2=S)" or run.setting.startswith("csd(")
    assert run.suite == "micro" and run.suite_version == f"1+steps={STEPS},eval_limit={PROMPTS}"
    assert run.config["suite"]["train"]["steps"] == STEPS
    assert run.config["reference_runs"] == {"teacher": runs["teacher"].id, "student-init": runs["student-init"].id}
    assert run.provenance["packages"]["torch"] and run.provenance["host"]["cpu_count"]
    assert run.train_tokens_per_s > 0 and run.wall_time_s > 0 and run.selected_step == STEPS


def test_metrics_per_seed_and_samples(store):
    run = rows(store, Run, role="distilled")[0]
    rouge = rows(store, Metric, run_id=run.id, metric="rougeL")
    assert sorted(m.seed for m in rouge) == [10, 20, 30]
    assert all(0.0 <= m.value <= 100.0 for m in rouge)
    samples = rows(store, Sample, run_id=run.id)
    assert len(samples) == PROMPTS * SEEDS
    # the per-seed metric is the mean of the stored per-sample scores: aggregates are recomputable
    for m in rouge:
        per = [s.scores["rougeL"] for s in samples if s.seed == m.seed]
        assert m.value == pytest.approx(sum(per) / len(per))
    assert all(json.loads(s.reference) for s in samples)
    names = {m.metric for m in rows(store, Metric, run_id=run.id)}
    assert {"self_bleu", "distinct_1", "distinct_2", "fkl_tok", "rkl_tok", "teacher_logprob"} <= names


def test_training_curve_has_loss_and_csd_terms(store):
    run = rows(store, Run, role="distilled")[0]
    curve = rows(store, CurvePoint, run_id=run.id, split="train")
    assert [c.step for c in curve] == [STEPS]  # log_every > STEPS: one point at the last step
    assert curve[0].loss > 0 and set(curve[0].terms) >= {"var_w1", "var_w2"}


def test_teacher_beats_undistilled_student_on_teacher_likelihood(store):
    """Even on 3 prompts the teacher's own samples are far likelier under it than the broken
    student's: a cheap sign that evaluation and the student construction are wired right."""
    def mean(role):
        run = rows(store, Run, role=role)[0]
        vals = [m.value for m in rows(store, Metric, run_id=run.id, metric="teacher_logprob")]
        return sum(vals) / len(vals)
    assert mean("teacher") > mean("student-init") + 1.0


def test_second_objective_reuses_reference_rows(store, capsys):
    assert main(["run", "--objective", "kl", "--db", str(store), *TINY]) == 0
    assert len(rows(store, Run, role="teacher")) == 1
    out = capsys.readouterr().out
    assert "rougeL" in out and "stored in" in out


def test_show_prints_config_and_table(store, capsys):
    run = rows(store, Run, role="distilled")[0]
    assert main(["show", str(run.id), "--db", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"run {run.id}" in out and "rougeL" in out and "teacher" in out


def test_nan_loss_is_recorded_as_failed(store, tmp_path, capsys):
    plugin = tmp_path / "nan_objective.py"
    plugin.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("always_nan", behaviour="balanced", paper="test plugin")
        def always_nan(s, t):
            """A broken objective: NaN everywhere."""
            return (s - t).sum(-1) * float("nan")
    '''))
    code = main(["run", "--objective", f"{plugin}:always_nan", "--db", str(store), *TINY])
    assert code == 1
    failed = rows(store, Run, status="failed")
    assert len(failed) == 1 and failed[0].error.startswith("diverged: loss is nan")
    assert "recorded as failed" in capsys.readouterr().err
