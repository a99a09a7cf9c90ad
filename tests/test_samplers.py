"""Samplers (kdbench/engine/samplers.py): where training responses come from.

The rules by hand (parsing, ranges, the keyed coin), then real `kdbench run`s on the tiny GSM8K
world (tests/tiny_models.py): ``gkd(lmbda=0)`` equals ``off`` bit for bit (the same teacher,
live), ``gkd(lmbda=1)`` equals ``imitkd``, on-policy training differs from off-policy, two
objectives complete under ``imitkd``, and what a run records of its sampler (setting, row,
identity, cost). Resume bit for bit with a sampler: tests/test_seams.py (the engine) and
tests/test_resume.py's machinery is not repeated here."""

from __future__ import annotations

import types

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.cli import main
from kdbench.engine.samplers import SAMPLERS, get_sampler
from kdbench.errors import UserError
from kdbench.prepare import Prepared
from kdbench.store import Artifact, CurvePoint, Metric, Run, Sample, open_engine

try:
    from tests.tiny_models import make_tiny_gsm8k, tiny_gsm8k_suite
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_gsm8k, tiny_gsm8k_suite


# ---------------------------------------------------------------------------- the rules by hand


def test_settings_are_canonical_and_defaults_filled():
    assert get_sampler("off").setting == "off" and not get_sampler("off").on_policy
    assert get_sampler("imitkd").setting == "imitkd" and get_sampler("imitkd").student_probability == 1.0
    assert get_sampler("gkd").setting == "gkd(lmbda=0.5)" == get_sampler(" gkd( lmbda = 0.50 ) ").setting
    assert get_sampler("gkd(lmbda=0)").student_probability == 0.0
    assert set(SAMPLERS) == {"off", "seqkd", "imitkd", "gkd", "distillm"}
    assert get_sampler("seqkd").setting == "seqkd(greedy=1)" and not get_sampler("seqkd").on_policy
    assert get_sampler("seqkd").student_probability == 0.0
    d = get_sampler("distillm(capacity=64, p0=0.2)")
    assert d.setting == "distillm(capacity=64,delta=0.1,eps=0.1,p0=0.2)" and d.on_policy
    assert d.params["capacity"] == 64 and isinstance(d.params["capacity"], int) and d.student_probability is None


@pytest.mark.parametrize("text, message", [
    ("gdk", "unknown sampler 'gdk' (did you mean 'gkd'?)"),
    ("gkd(lmbda=1.5)", "lmbda must be in [0, 1], got 1.5"),
    ("gkd(lmbda=-0.1)", "lmbda must be in [0, 1]"),
    ("gkd(lmbda=nan)", "lmbda must be in [0, 1]"),
    ("gkd(lmbda=half)", "is not a number"),
    ("imitkd(lmbda=0.5)", "sampler imitkd has no parameter 'lmbda' (it is gkd's); imitkd takes no parameters"),
    ("gkd(beta=0.5)", "sampler gkd has no parameter 'beta'; gkd takes lmbda"),
    ("gkd(lmbda)", "expected key=value"),
    ("seqkd(greedy=0.5)", "sampler seqkd: greedy must be a whole number, got 0.5"),
    ("seqkd(lmbda=1)", "sampler seqkd has no parameter 'lmbda' (it is gkd's); seqkd takes greedy"),
    ("distillm(capacity=0)", "capacity must be in [1, 1e+07], got 0"),
    ("distillm(p0=2)", "p0 must be in [0, 1], got 2"),
    ("distillm(eps=-1)", "eps must be in [0, 1e+09]"),
])
def test_a_mistaken_sampler_is_one_line(text, message):
    with pytest.raises(UserError) as err:
        get_sampler(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_coin_is_keyed_by_seed_and_step_only():
    half = get_sampler("gkd(lmbda=0.5)")
    flips = [half.students_turn(7, step) for step in range(2000)]
    assert flips == [half.students_turn(7, step) for step in range(2000)]  # no stream, no state
    assert 0.45 < sum(flips) / len(flips) < 0.55
    assert flips != [half.students_turn(8, step) for step in range(2000)]  # another seed, other flips
    assert not any(get_sampler("gkd(lmbda=0)").students_turn(7, s) for s in range(200))
    assert all(get_sampler("gkd(lmbda=1)").students_turn(7, s) for s in range(200))
    assert all(get_sampler("imitkd").students_turn(7, s) for s in range(200))
    assert sum(get_sampler("gkd(lmbda=0.2)").students_turn(3, s) for s in range(2000)) / 2000 == \
        pytest.approx(0.2, abs=0.03)


# ---------------------------------------------------------------------------- real runs on the tiny world


RUNS = {  # name -> (objective, sampler or None for the default, extra flags)
    "off": ("kl", None, ["--teacher-source", "live"]),
    "gkd0": ("kl", "gkd(lmbda=0)", []),
    "imitkd": ("kl", "imitkd", []),
    "gkd1": ("kl", "gkd(lmbda=1)", []),
    "csd_imitkd": ("csd", "imitkd", []),
    "csd_gkd": ("csd", "gkd(lmbda=0.5)", []),
    # seqkd: off-policy on the teacher's responses; the first with the teacher live, as the run on
    # the materialised set below (so the two differ in nothing but how the set reached training)
    "seqkd": ("kl", "seqkd", ["--teacher-source", "live"]),
    "off_on_seqkd_set": ("kl", None, ["--teacher-source", "live"]),
    "csd_seqkd": ("csd", "seqkd(greedy=0)", []),  # sampled, through the teacher cache
    # distillm from p = 1 with a buffer of one batch: step 0 samples, then replays (3 steps)
    "distillm": ("kl", "distillm(p0=1,capacity=8)", []),
    "csd_distillm": ("csd", "distillm(p0=1,capacity=8)", []),
}


_TRAIN_EXAMPLES = Prepared.train_examples


def _the_seqkd_set(prep):
    """The greedy seqkd set of ``prep``'s training examples (read from the cache the seqkd run filled)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Prepared, "train_examples", _TRAIN_EXAMPLES)
        return prep.seqkd_examples(greedy=True, progress=False)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny real run per entry of :data:`RUNS` (3 steps, one test prompt): each run's row,
    train curve, metrics, samples and cost."""
    from kdbench import suites

    tmp = tmp_path_factory.mktemp("samplers")
    teacher, student, data_root = make_tiny_gsm8k(tmp)
    small = tiny_gsm8k_suite()
    db = str(tmp / "runs.db")
    base = ["--suite", small.name, "--teacher", str(teacher), "--teacher-finetuned", "--student", str(student),
            "--data-dir", str(data_root), "--steps", "3", "--eval-limit", "1", "--no-save", "--no-progress",
            "--db", db]
    mp = pytest.MonkeyPatch()
    mp.setitem(suites.SUITES, small.name, small)
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("KDBENCH_CACHE", str(tmp / "cache"))  # its own: the seqkd sets are generated here, once
    threads = torch.get_num_threads()
    codes = {}
    try:
        torch.set_num_threads(1)
        for name, (objective, sampler, extra) in RUNS.items():
            with pytest.MonkeyPatch.context() as run_mp:
                if name == "off_on_seqkd_set":  # an off run whose training examples ARE the seqkd set
                    run_mp.setattr(Prepared, "train_examples", _the_seqkd_set)
                codes[name] = main(["run", "--objective", objective, *base, *extra,
                                    *(["--sampler", sampler] if sampler else [])])
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    engine = open_engine(db, readonly=True)
    out = {}
    with Session(engine) as s:
        rows = s.scalars(select(Run).where(Run.role == "distilled").order_by(Run.id)).all()
        assert len(rows) == len(RUNS), codes
        for name, r in zip(RUNS, rows):
            curve = [(c.step, c.loss, c.terms) for c in s.scalars(
                select(CurvePoint).where(CurvePoint.run_id == r.id, CurvePoint.split == "train").order_by(CurvePoint.id))]
            metrics = sorted((m.task, m.metric, m.seed, m.value) for m in
                             s.scalars(select(Metric).where(Metric.run_id == r.id)))
            samples = sorted((x.task, x.prompt_id, x.seed, x.output) for x in
                             s.scalars(select(Sample).where(Sample.run_id == r.id)))
            cost = s.scalars(select(Artifact).where(Artifact.run_id == r.id, Artifact.name == "cost")).one().data
            out[name] = types.SimpleNamespace(run=r, curve=curve, metrics=metrics, samples=samples, cost=cost)
        s.expunge_all()
    engine.dispose()
    seqkd_sets = sorted(p.name for p in (tmp / "cache" / "seqkd").iterdir() if (p / "meta.json").is_file())
    return {"codes": codes, "runs": out, "seqkd_sets": seqkd_sets, "cache": tmp / "cache"}


def test_every_sampler_run_finishes(runs):
    assert runs["codes"] == {name: 0 for name in RUNS}
    for name, r in runs["runs"].items():
        assert r.run.status == "finished" and r.curve[-1][0] == 3 and r.metrics and r.samples, name


def test_gkd_with_lambda_0_is_off_bit_for_bit(runs):
    off, gkd0 = runs["runs"]["off"], runs["runs"]["gkd0"]
    assert gkd0.curve == off.curve and gkd0.metrics == off.metrics and gkd0.samples == off.samples
    assert gkd0.cost["sampler_student_steps"] == 0


def test_gkd_with_lambda_1_is_imitkd_bit_for_bit(runs):
    imitkd, gkd1 = runs["runs"]["imitkd"], runs["runs"]["gkd1"]
    assert gkd1.curve == imitkd.curve and gkd1.metrics == imitkd.metrics and gkd1.samples == imitkd.samples
    assert imitkd.cost["sampler_student_steps"] == gkd1.cost["sampler_student_steps"] == 3


def test_on_policy_training_is_not_off_policy_training(runs):
    off, imitkd = runs["runs"]["off"], runs["runs"]["imitkd"]
    assert off.curve != imitkd.curve  # the losses of training on the student's answers, not the references
    c = imitkd.cost
    assert c["sampler_generated_tokens"] > 0 and c["sampler_generation_s"] > 0
    # where the training time went: the student's sampling, the teacher's scoring, the student's steps
    assert c["teacher_scoring_s"] > 0 and c["student_step_s"] > 0
    assert c["sampler_generation_s"] + c["teacher_scoring_s"] + c["student_step_s"] == pytest.approx(c["train_s"])
    assert 0 <= c["sampler_cut_responses"] <= 3 * 8  # 3 steps of a batch of 8


def test_a_run_records_its_sampler_in_its_row_identity_and_config(runs):
    r = {name: x.run for name, x in runs["runs"].items()}
    assert r["off"].setting == "kl" and r["imitkd"].setting == "kl+imitkd"
    assert r["gkd0"].setting == "kl+gkd(lmbda=0)" and r["csd_imitkd"].setting.endswith("+imitkd")
    assert r["off"].config["sampler"] == {"setting": "off", "name": "off", "params": {}}
    rec = r["imitkd"].config["sampler"]
    assert rec["setting"] == "imitkd" and rec["student_probability"] == 1.0 and "ImitKD" in rec["paper"]
    assert rec["sampling"]["max_new_tokens"] == tiny_gsm8k_suite().eval.max_new_tokens
    assert r["imitkd"].config["teacher_source"]["kind"] == "live"  # the cache cannot score new sequences
    assert r["imitkd"].config["data_order"]["sampler"] == "imitkd"
    own = {name: x for name, x in r.items() if name != "off_on_seqkd_set"}  # that one is `off`'s key by design
    assert len({x.config_hash for x in own.values()}) == len(own)  # each its own experiment


def test_seqkd_is_off_on_the_materialised_teacher_set_bit_for_bit(runs):
    seqkd, on_set, off = (runs["runs"][k] for k in ("seqkd", "off_on_seqkd_set", "off"))
    assert seqkd.curve == on_set.curve and seqkd.metrics == on_set.metrics and seqkd.samples == on_set.samples
    assert seqkd.curve != off.curve  # the teacher's responses are not the references
    rec = seqkd.run.config["sampler"]
    assert rec["setting"] == "seqkd(greedy=1)" and "SeqKD" in rec["paper"] and seqkd.run.setting == "kl+seqkd(greedy=1)"
    set_ = rec["teacher_responses"]
    assert set_["kind"] == "seqkd" and set_["decoding"] == {"greedy": True} and set_["ids"] == "<example id>@seqkd"
    assert set_["examples"] > 0 and set_["generated_tokens"] >= set_["examples"]
    assert 0 <= set_["cut_responses"] <= set_["examples"]
    sampled = runs["runs"]["csd_seqkd"].run.config["sampler"]["teacher_responses"]
    assert sampled["decoding"]["greedy"] is False and sampled["decoding"]["seed"] == 0 and sampled["key"] != set_["key"]
    # off-policy: the teacher cache serves the seqkd set (the first seqkd run asked for a live teacher)
    assert runs["runs"]["csd_seqkd"].run.config["teacher_source"]["kind"] == "cache"
    assert "seqkd_build_s" in seqkd.cost and "sampler_student_steps" not in seqkd.cost


def test_seqkd_generates_its_set_once(runs):
    # the first seqkd run generated and published the greedy set, the sampled run its own; the
    # run on the materialised set read the greedy one back: two sets, no more
    assert runs["runs"]["seqkd"].cost["seqkd_build_s"] > 0 and runs["runs"]["csd_seqkd"].cost["seqkd_build_s"] > 0
    keys = {runs["runs"][k].run.config["sampler"]["teacher_responses"]["key"] for k in ("seqkd", "csd_seqkd")}
    assert runs["seqkd_sets"] == sorted(keys)


def test_distillm_samples_then_replays_and_records_its_schedule(runs):
    for name in ("distillm", "csd_distillm"):
        c, r = runs["runs"][name].cost, runs["runs"][name].run
        # p = 1 and a buffer of one batch (8): step 1 samples; step 3's fresh share is 0, so it replays
        assert c["sampler_student_steps"] >= 1 and c["sampler_replay_steps"] >= 1
        assert c["sampler_student_steps"] + c["sampler_replay_steps"] == 3
        assert c["sampler_final_p"] == 1.0 and c["sampler_buffer_size"] == 8 and c["sampler_validation_s"] > 0
        rec = r.config["sampler"]
        assert rec["student_probability"] is None and rec["schedule"]["replay_ratio"].startswith("decreasing")
        assert r.setting.endswith("+distillm(capacity=8,delta=0.1,eps=0.1,p0=1)")


def test_the_run_key_reads_the_sampler_by_its_canonical_setting():
    from kdbench.config import RunConfig, run_key
    from kdbench.registry import get_objective

    kl = get_objective("kl")
    key = lambda sampler: run_key(RunConfig(objective="kl", sampler=sampler), kl, "4")  # noqa: E731
    assert key("gkd") == key("gkd(lmbda=0.5)") != key("gkd(lmbda=0.6)")
    assert key("off") == run_key(RunConfig(objective="kl"), kl, "4")  # off leaves every existing key as it was
    assert len({key("off"), key("imitkd"), key("gkd")}) == 3


def test_the_seqkd_sets_are_listed_and_cleared_with_the_caches(runs, capsys, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE", str(runs["cache"]))
    greedy, sampled = (runs["runs"][k].run.config["sampler"]["teacher_responses"]["key"] for k in ("seqkd", "csd_seqkd"))
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "seqkd teacher responses in" in out and "2 entries" in out
    assert f"{greedy}" in out and "responses, greedy" in out and "responses, sampled" in out
    assert main(["cache", "clear", sampled]) == 0
    assert [p.name for p in (runs["cache"] / "seqkd").iterdir() if (p / "meta.json").is_file()] == [greedy]


def test_kdbench_list_shows_every_sampler_with_its_parameters_and_paper(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("Samplers (--sampler"):].splitlines()[1:]
    for name, spec in SAMPLERS.items():
        (at,) = [i for i, ln in enumerate(lines) if ln.startswith(f"  {name}")]
        text = lines[at] if spec.summary in lines[at] else lines[at + 1]  # a long parameter list: its own line
        assert spec.summary in text and (spec.paper == "-" or spec.paper in text)
        assert text.index(spec.summary) == 33  # one column of summaries
        assert all(f"{k}={v:g}" in lines[at] for k, v in spec.defaults.items())
