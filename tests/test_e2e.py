"""End to end: `kdbench run` distils the real teacher into the real student, evaluates and
records. One tiny run (few steps, few prompts) is shared by the tests of this module."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.cli import main
from tests.fixtures_store import rows
from kdbench.store import CurvePoint, Metric, Run, Sample, open_engine

STEPS, PROMPTS, SEEDS = 3, 3, 5  # micro samples the open task over 5 seeds
# micro fine-tunes its teacher first (~15 min for the suite's 2 epochs): 2 steps here, a labelled quick run
TINY = ["--finetune-steps", "2", "--steps", str(STEPS), "--eval-limit", str(PROMPTS), "--no-save", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    db = tmp_path_factory.mktemp("e2e") / "runs.db"
    assert main(["run", "--objective", "csd", "--param", "tau=1.5", "--db", str(db), *TINY]) == 0
    return db


def test_run_writes_reference_rows_and_the_distilled_run(store):
    runs = {r.role: r for r in rows(store, Run)}
    assert set(runs) == {"teacher", "student-init", "distilled"}
    assert all(r.status == "finished" for r in runs.values())
    run = runs["distilled"]
    assert run.objective == "csd" and run.params["tau"] == 1.5
    assert run.setting == "csd(alpha=0.15,tau=1.5,w1=S,w2=S)" or run.setting.startswith("csd(")
    assert run.suite == "micro" and run.suite_version == f"4+finetune_steps=2,steps={STEPS},eval_limit={PROMPTS}"
    assert run.config["suite"]["train"]["steps"] == STEPS
    assert run.config["reference_runs"] == {"teacher": runs["teacher"].id, "student-init": runs["student-init"].id}
    assert run.provenance["packages"]["torch"] and run.provenance["host"]["cpu_count"]
    assert run.train_tokens_per_s > 0 and run.wall_time_s > 0 and run.selected_step == STEPS


def test_metrics_per_seed_and_samples(store):
    run = rows(store, Run, role="distilled")[0]
    rouge = rows(store, Metric, run_id=run.id, metric="rougeL", task="chatterbot")
    assert sorted(m.seed for m in rouge) == [10, 20, 30, 40, 50]
    assert all(0.0 <= m.value <= 100.0 for m in rouge)
    samples = rows(store, Sample, run_id=run.id, task="chatterbot")
    assert len(samples) == PROMPTS * SEEDS
    # the per-seed metric is the mean of the stored per-sample scores: aggregates are recomputable
    for m in rouge:
        per = [s.scores["rougeL"] for s in samples if s.seed == m.seed]
        assert m.value == pytest.approx(sum(per) / len(per))
    assert all(json.loads(s.reference) for s in samples)
    names = {m.metric for m in rows(store, Metric, run_id=run.id, task="chatterbot")}
    assert {"self_bleu", "distinct_1", "distinct_2", "fkl_tok", "rkl_tok", "teacher_logprob"} <= names
    # closed-book trivia: one greedy decode per prompt, scored by exact answer (seed NULL)
    trivia = rows(store, Metric, run_id=run.id, task="trivia", metric="accuracy")
    assert [m.seed for m in trivia] == [None] and 0.0 <= trivia[0].value <= 100.0
    assert len(rows(store, Sample, run_id=run.id, task="trivia")) == PROMPTS


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


def test_objective_dropped_into_plugin_path_is_listed_and_runs(store, tmp_path, monkeypatch, capsys):
    """The whole extension story: one file in $KDBENCH_PLUGIN_PATH, no harness change."""
    from kdbench import registry

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "half_rkl.py").write_text(textwrap.dedent('''
        from kdbench.registry import objective, Param

        @objective("half_rkl", behaviour="mode-seeking", paper="kdbench test plugin",
                   params=[Param("scale", float, 0.5, doc="multiplier")])
        def half_rkl(s, t, scale):
            """Scaled reverse KL.

            scale · Σ_v q (log q − log p)
            """
            lq, lp = s.log_softmax(-1), t.log_softmax(-1)
            return scale * (lq.exp() * (lq - lp)).sum(-1)
    '''))
    monkeypatch.setenv("KDBENCH_PLUGIN_PATH", str(plugins))
    registry.refresh()
    try:
        assert main(["list"]) == 0
        assert "half_rkl" in capsys.readouterr().out
        assert main(["run", "--objective", "half_rkl", "--param", "scale=0.25", "--db", str(store), *TINY]) == 0
        run = [r for r in rows(store, Run) if r.objective == "half_rkl"][0]
        assert run.status == "finished" and run.params == {"scale": 0.25}
    finally:
        monkeypatch.delenv("KDBENCH_PLUGIN_PATH")
        registry.refresh()


def test_analyze_shows_csd_ss_is_twice_rkl_in_gradient(store, capsys):
    """REFERENCE §1: at τ = 1 the CSD (S,S) gradient is 2 × the reverse-KL gradient, on real logits.
    The teacher is the module's quick one (2 fine-tuning steps, already prepared): the identity holds
    for any teacher, and the suite's full fine-tune would cost ~5 min on a fresh machine."""
    assert main(["analyze", "--objectives", "rkl", "csd_ss", "kl", "--finetune-steps", "2", "--db", str(store)]) == 0
    assert "csd" in capsys.readouterr().out
    run = rows(store, Run, role="analysis")[-1]
    with Session(open_engine(str(store))) as s:
        from kdbench.store import Artifact
        art = s.scalars(select(Artifact).where(Artifact.run_id == run.id)).one()
    names, cos, ratio = art.data["names"], art.data["cosine"], art.data["norm_ratio"]
    i, j, k = names.index("rkl"), names.index("csd(tau=1.0,w1=S,w2=S)"), names.index("kl")
    assert cos[i][j] == pytest.approx(1.0, abs=1e-4)
    assert ratio[j][i] == pytest.approx(2.0, rel=1e-3)
    assert cos[i][k] < 0.999  # forward and reverse KL point elsewhere


def test_lm_eval_on_a_saved_student(store, tmp_path, capsys):
    """`kdbench eval RUN --lm-eval TASK` on the student the run saved (kdbench's offline task)."""
    from kdbench.data.loaders import shared_data_dir

    if not (shared_data_dir() / "translation").is_dir():
        pytest.skip("shared evaluation data (../shared/data) not found; set KDBENCH_SHARED_DATA")
    assert main(["run", "--objective", "rkl", "--db", str(store), "--finetune-steps", "2", "--steps", "1", "--eval-limit", "1",
                 "--no-progress"]) == 0
    run = [r for r in rows(store, Run) if r.objective == "rkl"][-1]
    try:
        assert (Path(run.checkpoint_path) / "config.json").is_file()
        assert main(["eval", str(run.id), "--lm-eval", "kdbench_multi30k_mc", "--limit", "8",
                     "--db", str(store)]) == 0
    finally:
        shutil.rmtree(run.checkpoint_path, ignore_errors=True)  # weights never outlive the test
    acc = [m for m in rows(store, Metric, run_id=run.id) if m.task == "lm_eval/kdbench_multi30k_mc"]
    assert {m.metric for m in acc} >= {"acc"} and all(0.0 <= m.value <= 1.0 for m in acc)


def test_every_value_written_fits_its_columns_declared_length(store):
    """SQLite keeps a string of any length in a VARCHAR(32); PostgreSQL refuses it and the run fails
    at its first write (a quick run's suite label, "3+finetune_steps=2,steps=3,eval_limit=3", did).
    So the lengths are checked here, on what real runs wrote to this SQLite store."""
    from sqlalchemy import String, text

    from kdbench.store.models import Base

    engine = open_engine(str(store), readonly=True)
    checked = 0
    with engine.connect() as c:
        for table in Base.metadata.sorted_tables:
            for col in table.columns:
                if isinstance(col.type, String) and col.type.length:
                    longest = c.execute(text(f"SELECT max(length({col.name})) FROM {table.name}")).scalar()
                    assert (longest or 0) <= col.type.length, f"{table.name}.{col.name}: {longest} > {col.type.length}"
                    checked += 1
    assert checked >= 10
