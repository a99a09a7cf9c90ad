"""One suite version, two teachers: results made under different reference fingerprints (the same
suite fine-tunes its teacher differently on another machine kind) are never pooled — each teacher
is its own group ``VERSION@FP`` in every listing, and runs of one configuration under two teachers
are two experiments, not repeats."""

from __future__ import annotations

import pandas as pd
import pytest

from kdbench import results as R
from kdbench.store import RunWriter, open_engine

try:
    from tests.fixtures_store import (KL, PROVENANCE, STUDENT, SUITE, TEACHER, TEST, VERSION, _config, _metric_rows,
                                      _sample_rows, build_fixture_store)
except ImportError:  # run from inside tests/
    from fixtures_store import (KL, PROVENANCE, STUDENT, SUITE, TEACHER, TEST, VERSION, _config, _metric_rows,
                                _sample_rows, build_fixture_store)

OTHER = "fq-other-machine-kind"  # the fixture's own teacher is "fp-micro-1"


def _other_teacher_runs(engine) -> dict:
    """Reference rows and one kl run (seed 1, as in the fixture) under another teacher, with
    scores shifted by +50 so that any pooling would show."""
    ids = {}
    for row, setting, seed in ((TEACHER, None, 0), (STUDENT, None, 0), (KL, KL, 1)):
        config = {**_config(row, seed), "reference_fingerprint": OTHER}
        role = row if setting is None else "distilled"
        extra = {} if setting is None else {"objective": "kl", "params": {}, "setting": KL}
        w = RunWriter.start(engine, role=role, suite=SUITE, suite_version=VERSION, seed=seed, config=config,
                            provenance=PROVENANCE, **extra)
        w.metrics([(t, m, v + 50.0, s) for t, m, v, s in _metric_rows(row, None if setting is None else seed)])
        w.samples(_sample_rows(row, None if setting is None else seed))
        w.finish(wall_time_s=1.0)
        ids[row] = w.run_id
    return ids


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    path = tmp_path_factory.mktemp("groups") / "runs.db"
    ids = build_fixture_store(path)
    engine = open_engine(str(path))
    before = R.leaderboard(engine, SUITE, "rougeL", [TEST], VERSION)
    ids["other"] = _other_teacher_runs(engine)
    yield engine, ids, before
    engine.dispose()


def test_each_teacher_is_its_own_group(two_teachers):
    engine, ids, before = two_teachers
    mine, other = f"{VERSION}@fp-micro", f"{VERSION}@fq-other"
    suites = R.list_suites(engine)
    versions = list(suites[suites.suite == SUITE].suite_version)
    assert versions[0] == other and set(versions) == {other, mine, "0"}  # newest activity first; v0: one teacher
    assert R.default_version(engine, SUITE) == other  # the newest finished run's group
    assert R.split_version(mine) == (VERSION, "fp-micro") and R.split_version("1+steps=3") == ("1+steps=3", None)
    assert R.run_version(engine, ids["other"][KL]) == other and R.run_version(engine, ids[KL][0]) == mine
    # the fixture's own group reads exactly as it did before the other teacher's runs arrived
    pd.testing.assert_frame_equal(R.leaderboard(engine, SUITE, "rougeL", [TEST], mine), before)
    lb = R.leaderboard(engine, SUITE, "rougeL", [TEST], other)
    assert set(lb.setting) == {TEACHER, STUDENT, KL}
    mean = {s: float(v) for s, v in zip(lb.setting, lb[f"{TEST}"])}
    ref = {s: float(v) for s, v in zip(before.setting, before[f"{TEST}"])}
    assert mean[TEACHER] == pytest.approx(ref[TEACHER] + 50.0)  # not pooled with the fixture's teacher
    assert R.list_settings(engine, SUITE, other).n_runs.tolist() == [1, 1, 1]


def test_the_same_configuration_under_another_teacher_is_not_a_repeat(two_teachers):
    engine, ids, _ = two_teachers
    runs = R.list_runs(engine, SUITE, "finished").set_index("run_id")
    assert runs.loc[ids["other"][KL], "repeats"] == 1 and runs.loc[ids[KL][0], "repeats"] == 1
    assert runs.loc[ids["other"][KL], "suite_version"] == f"{VERSION}@fq-other"
    assert R.repeats_of(engine, ids["other"][KL]) == [ids["other"][KL]]
    assert R.teacher_run_for(engine, ids["other"][KL]) == ids["other"][TEACHER]


def test_a_version_with_one_teacher_stays_plain(tmp_path):
    engine = open_engine(str(tmp_path / "one.db"))
    build_fixture_store(str(tmp_path / "one.db"))
    assert R.default_version(engine, SUITE) == VERSION
    assert VERSION in set(R.list_suites(engine).suite_version)
    assert set(R.list_runs(engine, SUITE).suite_version) <= {VERSION, "0"}
    engine.dispose()
