"""kdbench.results on the fixture store: every expected number is worked out by hand from the closed
forms in tests/fixtures_store.py (value = base + spread·(train offset + sampling offset)).

Constants used below (Student-t 0.975 quantiles, standard tables):
    t(2) = 4.3026527, t(4) = 2.7764451, t(5) = 2.5705818, t(10) = 2.2281389
A distilled setting on one task has per-seed values base + {-2,-1,0,0,1,2}·spread: std = sqrt(10/5)
= sqrt(2)·spread, n = 6, CI half-width = t(5)·sqrt(2)/sqrt(6)·spread = 1.4841263·spread.
A reference row has base + {-1,0,1}·spread: std = spread, n = 3, half-width = t(2)/sqrt(3)·spread
= 2.4841377·spread.
Welch between two distilled settings: se = sqrt(2/6 + 2/6) = 0.8164966, df = 10.

Paired differences (row A − row B, per training seed, prompt p = 0..19 and sampling seed): the training- and
sampling-seed offsets are common to every row, so they cancel and
    d_task(p) = (BASE_A − BASE_B) + (SLOPE_A − SLOPE_B) · (p − 9.5)         on every seed.
The per-prompt spread is |ΔSLOPE| · sd(p) with sd(p) = sqrt(35), so the closed-form paired SE on one task is
|ΔSLOPE| · sqrt(35/20) = |ΔSLOPE| · 1.3228757, on the mean of the two tasks half of sqrt(2) times that; the
bootstrap SE is sqrt(19/20) = 0.9746794 times the closed form (plug-in variance).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

try:
    from tests.fixtures_store import (ARITH, CHATTERBOT, CSD_SS, CSD_TS, FAIL_REASON, FAILED_SETTING, KL, QUICK, RKL,
                                      SUITE, TEST, build_versions_store)
except ImportError:  # tests/ itself on sys.path
    from fixtures_store import (ARITH, CHATTERBOT, CSD_SS, CSD_TS, FAIL_REASON, FAILED_SETTING, KL, QUICK, RKL,
                                SUITE, TEST, build_versions_store)

try:
    from tests.results_helpers import (H3, H6, P_FLOOR, PLUG_IN, SD_P, SE, T10, Z, normal_p, row,
                                       store)  # noqa: F401  (store: a module fixture)
except ImportError:  # tests/ itself on sys.path
    from results_helpers import (H3, H6, P_FLOOR, PLUG_IN, SD_P, SE, T10, Z, normal_p, row,
                                 store)  # noqa: F401

from kdbench import results as R
from kdbench.store import RunWriter, open_engine

# ---------------------------------------------------------------------------- t distribution


@pytest.mark.parametrize("df,expected", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (5, 2.5705818),
                                         (10, 2.2281389), (30, 2.0422725), (1e6, 1.9599663)])
def test_t_quantile_matches_tables(df, expected):
    assert R.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-7)


def test_t_functions_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2.5, 3, 7.3, 19, 120):
        for q in (0.9, 0.95, 0.975, 0.995):
            assert R.t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)
        for t in (0.1, 1.0, 2.5, 6.0):
            assert R.t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-8, abs=1e-14)


def test_welch_from_summary_statistics():
    p, half, df = R.welch(33.25, math.sqrt(2), 6, 31.0, math.sqrt(2), 6)
    assert df == pytest.approx(10.0)
    assert half == pytest.approx(T10 * SE, abs=1e-6)
    assert p == pytest.approx(0.0202799, abs=1e-6)  # t = 2.25 / 0.8164966 = 2.7556550 on 10 df
    assert math.isnan(R.welch(1.0, math.nan, 1, 2.0, 1.0, 3)[0])  # n = 1: undefined
    assert R.welch(1.0, 0.0, 3, 1.0, 0.0, 3)[0] == 1.0
    assert R.welch(1.0, 0.0, 3, 2.0, 0.0, 3)[0] == 0.0


# ---------------------------------------------------------------------------- catalogue


def test_store_state_and_listing(store, tmp_path):
    engine, ids, _ = store
    assert R.store_state(engine) == "ok"
    suites = R.list_suites(engine)
    assert list(zip(suites.suite, suites.suite_version)) == [(SUITE, "1"), (SUITE, "0")]
    v1 = suites.iloc[0]
    # teacher, student-init, 8 distilled, analysis = 11 finished; the failed and the running run
    assert (v1.n_finished, v1.n_failed, v1.n_running) == (11, 1, 1)
    assert R.default_version(engine, SUITE) == "1"
    assert R.list_tasks(engine, SUITE) == [ARITH, TEST]
    assert R.list_tasks(engine, SUITE, metric="accuracy") == [ARITH]
    metrics = R.list_metrics(engine, SUITE)
    assert metrics[:2] == ["rougeL", "accuracy"]  # headline metrics first, the rest from the data
    assert set(metrics) == {"rougeL", "accuracy", "self_bleu", "distinct_1", "distinct_2", "mean_length",
                            "degenerate_frac", "fkl_tok", "rkl_tok", "teacher_logprob"}
    assert "accuracy" not in R.list_metrics(engine, SUITE, TEST)
    settings = R.list_settings(engine, SUITE)
    assert list(settings.setting) == ["teacher", "student-init", CSD_SS, CSD_TS, KL, RKL]
    assert FAILED_SETTING not in set(settings.setting)


def test_store_states_of_unusual_stores(tmp_path):
    empty_file = tmp_path / "empty.db"
    empty_file.write_bytes(b"")
    assert R.store_state(open_engine(str(empty_file), readonly=True)) == "no_schema"
    assert R.store_fingerprint(open_engine(str(empty_file), readonly=True)) is None
    schema_only = tmp_path / "schema.db"
    open_engine(str(schema_only)).dispose()
    assert R.store_state(open_engine(str(schema_only), readonly=True)) == "empty"
    failed_only = tmp_path / "failed.db"
    w_engine = open_engine(str(failed_only))
    RunWriter.start(w_engine, role="distilled", suite=SUITE, suite_version="1", seed=1, config={}, provenance={},
                    objective="kl", setting=KL).fail("OOM")
    ro = open_engine(str(failed_only), readonly=True)
    assert R.store_state(ro) == "no_finished"
    assert R.leaderboard(ro, SUITE, "rougeL").empty
    assert list(R.failed_runs(ro).error) == ["OOM"]


def test_fingerprint_changes_when_a_run_is_added(tmp_path):
    path = tmp_path / "fp.db"
    w_engine = open_engine(str(path))
    ro = open_engine(str(path), readonly=True)
    before = R.store_fingerprint(ro)
    w = RunWriter.start(w_engine, role="distilled", suite=SUITE, suite_version="1", seed=1, config={}, provenance={},
                        objective="kl", setting=KL)
    started = R.store_fingerprint(ro)
    w.metrics([(TEST, "rougeL", 1.0, 10)])
    with_metric = R.store_fingerprint(ro)
    w.finish()
    done = R.store_fingerprint(ro)
    assert len({before, started, with_metric, done}) == 4


def test_standard_version_is_the_default_beside_quick_runs(tmp_path):
    path = tmp_path / "versions.db"
    ids = build_versions_store(path)  # version 1 first, the quick-run version after it (newest)
    engine = open_engine(str(path), readonly=True)
    suites = R.list_suites(engine)
    assert list(suites.suite_version) == ["1", QUICK] and list(suites.quick) == [False, True]
    assert R.default_version(engine, SUITE) == "1"
    assert (R.version_label("1"), R.version_label(QUICK)) == ("1 (standard)", f"{QUICK} (quick)")
    lb = R.leaderboard(engine, SUITE, "rougeL")
    assert lb.attrs["suite_version"] == "1" and list(lb.setting) == ["teacher", "student-init", KL]
    assert row(lb, KL)[CHATTERBOT] == 20.0
    quick = R.leaderboard(engine, SUITE, "rougeL", suite_version=QUICK)
    assert list(quick.setting) == ["teacher", "student-init", RKL, KL] and row(quick, KL)[CHATTERBOT] == 6.0
    # a seed-free metric (seed NULL): one value per run, so no std or CI, and no row can be told apart
    sb = R.leaderboard(engine, SUITE, "self_bleu_across_seeds", suite_version=QUICK)
    assert sb.attrs["lower_is_better"] is True
    kl = row(sb, KL)
    assert (kl[CHATTERBOT], kl[R.stat_col(CHATTERBOT, "n")], kl["rank"]) == (2.1, 1, 1)
    assert pd.isna(kl[R.stat_col(CHATTERBOT, "ci95")]) and bool(row(sb, RKL).tied_with_best)
    wide = R.run_metrics(engine, ids[(QUICK, KL)])
    assert wide.set_index("metric").loc["self_bleu_across_seeds", "no seed"] == 2.1
    summary = R.run_summary(engine, ids[(QUICK, KL)]).set_index("metric")
    assert summary.loc["fkl_tok", "n_seeds"] == 1 and pd.isna(summary.loc["fkl_tok", "std"])
    engine.dispose()

    only_quick = tmp_path / "quick.db"
    build_versions_store(only_quick, standard=False)
    engine = open_engine(str(only_quick), readonly=True)
    assert R.default_version(engine, SUITE) == QUICK and R.leaderboard(engine, SUITE, "rougeL").attrs[
        "suite_version"] == QUICK
    engine.dispose()


# ---------------------------------------------------------------------------- leaderboard


def test_leaderboard_rougeL_all_tasks(store):
    engine, ids, _ = store
    lb = R.leaderboard(engine, SUITE, "rougeL")
    assert lb.attrs["tasks"] == [ARITH, TEST] and lb.attrs["rank_by"] == R.AVERAGE
    assert lb.attrs["suite_version"] == "1" and lb.attrs["lower_is_better"] is False
    # reference rows first, then by rank: averages csd(T,S) 33.25, csd(S,S) 33.0, kl 31.0, rkl 30.5
    assert list(lb.setting) == ["teacher", "student-init", CSD_TS, CSD_SS, KL, RKL]
    kl = row(lb, KL)
    assert kl[TEST] == pytest.approx(22.0)  # run means 21 and 23 (seeds 10/20/30), then their mean
    assert kl[R.stat_col(TEST, "std")] == pytest.approx(math.sqrt(2))
    assert kl[R.stat_col(TEST, "n")] == 6 and kl.n_runs == 2  # the running run's 99 does not count
    assert kl[R.stat_col(TEST, "ci95")] == pytest.approx(H6, abs=1e-6)
    assert kl[R.stat_col(TEST, "ci_lo")] == pytest.approx(22.0 - H6, abs=1e-6)
    assert kl[R.stat_col(TEST, "ci_hi")] == pytest.approx(22.0 + H6, abs=1e-6)
    assert kl[ARITH] == pytest.approx(40.0)
    assert kl[R.AVERAGE] == pytest.approx(31.0)  # per (run, seed) (test + arith)/2 = 31 + {-2..2}
    assert kl[R.stat_col(R.AVERAGE, "ci95")] == pytest.approx(H6, abs=1e-6)
    t = row(lb, "teacher")
    assert (t[TEST], t[ARITH], t[R.AVERAGE]) == (30.0, 50.0, 40.0)
    assert t[R.stat_col(TEST, "ci95")] == pytest.approx(H3, abs=1e-6) and t[R.stat_col(TEST, "n")] == 3
    assert pd.isna(t["rank"]) and not t.tied_with_best
    assert row(lb, "student-init")[TEST] == 10.0
    assert [int(row(lb, s)["rank"]) for s in (CSD_TS, CSD_SS, KL, RKL)] == [1, 2, 3, 4]
    # paired vs the best (33.25), the mean of the two tasks: csd(S,S) d = -0.25 + 0.4(p - 9.5) on both tasks
    # (closed-form SE 0.4 · 1.3228757 / sqrt(2) = 0.3741657) → z 0.67, tied; kl and rkl: ΔSLOPE ±0.2 → SE 0.187,
    # Δ -2.25 / -2.75: every replicate below 0 → p at the floor 2/2001
    assert [bool(row(lb, s).tied_with_best) for s in (CSD_TS, CSD_SS, KL, RKL)] == [True, True, False, False]
    ss = row(lb, CSD_SS)
    se = 0.4 * SD_P / math.sqrt(2) * PLUG_IN
    assert ss.delta_vs_best == pytest.approx(-0.25) and ss.test_vs_best == "paired bootstrap"
    assert ss.p_vs_best == pytest.approx(normal_p(0.25 / se), abs=0.03)
    assert (ss.delta_vs_best_lo, ss.delta_vs_best_hi) == (pytest.approx(-0.25 - Z * se, abs=0.06),
                                                         pytest.approx(-0.25 + Z * se, abs=0.06))
    assert row(lb, KL).p_vs_best == pytest.approx(P_FLOOR) and row(lb, RKL).p_vs_best == pytest.approx(P_FLOOR)
    assert row(lb, KL).delta_vs_best == pytest.approx(-2.25) and row(lb, RKL).delta_vs_best == pytest.approx(-2.75)
    assert row(lb, CSD_TS).test_vs_best == "best" and pd.isna(row(lb, CSD_TS).p_vs_best)
    # Welch on the pooled per-seed values would have said p 0.766 / 0.0203 / 0.0071
    assert R.welch(33.0, math.sqrt(2), 6, 33.25, math.sqrt(2), 6)[0] == pytest.approx(0.7657434, abs=1e-6)
    # the gradient class csd(S,S) ∥ rkl is shown, but the paired test separates them: ranked apart
    assert (ss.equiv_class, row(lb, RKL).equiv_class, row(lb, KL).equiv_class) == ("∥1", "∥1", "")
    (c,) = lb.attrs["classes"]
    assert c["members"] == [CSD_SS, RKL] and not c["shared_rank"] and c["tests"][0]["separated"]
    assert c["tests"][0]["mean"] == pytest.approx(-2.5)
    # share of the teacher − undistilled band (40 − 15 on average): csd(T,S) (33.25 − 15) / 25 = 73 %
    assert row(lb, CSD_TS).band_recovered == pytest.approx(73.0) and row(lb, KL).band_recovered == pytest.approx(64.0)
    assert row(lb, CSD_TS).band_lo < 73.0 < row(lb, CSD_TS).band_hi
    assert lb.attrs["score"] == "rougeL" and lb.attrs["ce"] is None and set(lb.vs_ce) == {""}
    assert (kl.repeats, t.repeats) == (0, 0)
    # cost: means over the two training-seed runs
    assert (kl.wall_time_s, kl.train_tokens_per_s, kl.peak_memory_mb) == (105.0, 2050.0, 905.0)
    assert row(lb, CSD_SS).wall_time_s == 125.0
    assert FAILED_SETTING not in set(lb.setting)


def test_leaderboard_single_task_and_direction(store):
    engine, _, _ = store
    lb = R.leaderboard(engine, SUITE, "rougeL", [TEST])
    assert R.AVERAGE not in lb.columns and lb.attrs["rank_by"] == TEST
    # micro/test: csd(S,S) 25, csd(T,S) 24.5 (d = -0.5 - 0.4(p - 9.5): SE 0.529, z 0.97, tied), rkl 23
    # (d = -2 - 0.6(p - 9.5): SE 0.794, z 2.6, separated), kl 22
    assert [int(row(lb, s)["rank"]) for s in (CSD_SS, CSD_TS, RKL, KL)] == [1, 2, 3, 4]
    assert bool(row(lb, CSD_TS).tied_with_best) and not bool(row(lb, RKL).tied_with_best)
    assert row(lb, CSD_TS).p_vs_best == pytest.approx(normal_p(0.5 / (0.4 * SD_P * PLUG_IN)), abs=0.03)
    assert row(lb, RKL).p_vs_best == pytest.approx(normal_p(2.0 / (0.6 * SD_P * PLUG_IN)), abs=0.01)

    sb = R.leaderboard(engine, SUITE, "self_bleu", [TEST])  # lower is better; no per-sample score: Welch
    assert sb.attrs["lower_is_better"] is True and sb.attrs["score"] is None
    assert [int(row(sb, s)["rank"]) for s in (KL, CSD_TS, RKL, CSD_SS)] == [1, 2, 3, 4]
    assert list(sb.tied_with_best[sb.role == "distilled"]) == [True, False, False, False]
    assert set(sb.test_vs_best[sb.role == "distilled"]) == {"best", "welch"}

    acc = R.leaderboard(engine, SUITE, "accuracy")  # exists on micro/arith only
    assert acc.attrs["tasks"] == [ARITH] and TEST not in acc.columns
    kl = row(acc, KL)
    assert kl[ARITH] == 40.0 and kl[R.stat_col(ARITH, "std")] == pytest.approx(5 * math.sqrt(2))
    assert kl[R.stat_col(ARITH, "ci95")] == pytest.approx(5 * H6, abs=1e-5)
    assert "teacher" in set(acc.setting)

    # the fkl_tok metric has no teacher row (the fixture writes it for students only)
    assert "teacher" not in set(R.leaderboard(engine, SUITE, "fkl_tok").setting)


def test_leaderboard_other_suite_version_and_unknown_metric(store):
    engine, _, _ = store
    old = R.leaderboard(engine, SUITE, "rougeL", suite_version="0")
    assert list(old.setting) == [KL] and old.iloc[0][TEST] == 99.0
    assert old.iloc[0][R.stat_col(TEST, "ci95")] == 0.0  # three seeds of 99: std 0, CI 0
    none = R.leaderboard(engine, SUITE, "no_such_metric")
    assert none.empty and "rank" in none.columns


def test_failed_runs_listed_separately(store):
    engine, ids, _ = store
    failed = R.failed_runs(engine, SUITE, "1")
    assert list(failed.run_id) == [ids["failed"]]
    assert failed.iloc[0].error == FAIL_REASON and failed.iloc[0].setting == FAILED_SETTING
    assert R.status_counts(engine, SUITE, "1") == {"finished": 11, "failed": 1, "running": 1}
