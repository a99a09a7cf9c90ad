"""kdbench.results on the paired-statistics store (tests/fixtures_store.py build_paired_store: values and
expectations derived in its docstring): repeats as one observation, the paired test against Welch, equivalence
classes sharing a rank, the teacher-undistilled band and `ce`, the README table and `kdbench show`."""

from __future__ import annotations

import math

import pandas as pd
import pytest

try:
    from tests.fixtures_store import CE, CSD_SS, KL, PAIRED_TASK, RKL, SUITE, build_paired_store
except ImportError:  # tests/ itself on sys.path
    from fixtures_store import CE, CSD_SS, KL, PAIRED_TASK, RKL, SUITE, build_paired_store

try:
    from tests.results_helpers import P_FLOOR, cells, row
    from tests.store_helpers import store_location
except ImportError:  # tests/ itself on sys.path
    from results_helpers import P_FLOOR, cells, row
    from store_helpers import store_location

from kdbench import results as R
from kdbench.store import open_engine



@pytest.fixture(scope="module")
def paired_store(tmp_path_factory):
    ids = build_paired_store(path := store_location(tmp_path_factory.mktemp("paired")))
    engine = open_engine(str(path), readonly=True)
    yield engine, ids
    engine.dispose()


def test_repeats_are_one_observation(paired_store):
    engine, ids = paired_store
    lb = R.leaderboard(engine, SUITE, "rougeL")
    csd, ce = row(lb, CSD_SS), row(lb, CE)
    # csd(S,S) seed 0 has two runs (one config_hash): averaged to 30.5, seed 1 29.5 → 30.0 (pooling the three
    # runs would give (30.2 + 30.8 + 29.5) / 3 = 30.1667 and 9 per-seed values)
    assert csd[PAIRED_TASK] == pytest.approx(30.0) and csd[R.stat_col(PAIRED_TASK, "n")] == 6
    assert (csd.n_runs, csd.repeats) == (2, 1)
    assert csd[R.stat_col(PAIRED_TASK, "std")] == pytest.approx(math.sqrt(7.5))
    # ce seed 1: two runs with config_hash NULL, matched by setting + suite version + seed
    assert ce[PAIRED_TASK] == pytest.approx(25.0) and (ce.n_runs, ce.repeats) == (2, 1)
    assert (row(lb, KL).n_runs, row(lb, KL).repeats) == (2, 0)
    runs = R.list_runs(engine, SUITE).set_index("run_id")
    assert [runs.loc[i].repeats for i in ids[CSD_SS]] == [2, 2, 1]
    assert [runs.loc[i].repeats for i in ids[CE]] == [1, 2, 2] and pd.isna(runs.loc[ids[CE][1]].config_hash)
    assert R.repeats_of(engine, ids[CSD_SS][1]) == ids[CSD_SS][:2] and R.repeats_of(engine, ids[KL][0]) == [ids[KL][0]]
    settings = R.list_settings(engine, SUITE).set_index("setting")
    assert (settings.loc[CSD_SS].n_runs, settings.loc[CSD_SS].repeats) == (2, 1)
    # the paired test sees one observation per training seed too: 2 seeds × 12 prompts × 3 sampling seeds
    r = R.paired_difference(engine, SUITE, "1", CSD_SS, KL, PAIRED_TASK, "rougeL")
    assert (r["n_train_seeds"], r["n_prompts"], r["n_cells"]) == (2, 12, 72) and r["mean"] == pytest.approx(0.5)


def test_paired_separates_what_welch_cannot(paired_store):
    engine, _ = paired_store
    lb = R.leaderboard(engine, SUITE, "rougeL")
    kl, best = row(lb, KL), row(lb, CSD_SS)
    # Welch on the per-seed values: 29.5 vs 30.0, std sqrt(7.5) each, n 6 → p 0.758: tied
    welch_p = R.welch(kl[PAIRED_TASK], kl[R.stat_col(PAIRED_TASK, "std")], 6,
                      best[PAIRED_TASK], best[R.stat_col(PAIRED_TASK, "std")], 6)[0]
    assert welch_p == pytest.approx(0.7583315, abs=1e-6)  # t = 0.5 / sqrt(2 · 7.5 / 6) = 0.316, df 10
    # paired: kl − csd(S,S) = -0.5 ± 0.2 on every prompt → separated, CI [-0.6, -0.4] (4 of 12 prompts ≥ …)
    assert not kl.tied_with_best and kl.test_vs_best == "paired bootstrap"
    assert kl.p_vs_best == pytest.approx(P_FLOOR) and kl.delta_vs_best == pytest.approx(-0.5)
    assert (kl.delta_vs_best_lo, kl.delta_vs_best_hi) == (pytest.approx(-0.6), pytest.approx(-0.4))
    # and the other way round on self_bleu (no per-sample score): Welch decides, as before
    sb = R.leaderboard(engine, SUITE, "self_bleu")
    assert set(sb.test_vs_best[sb.role == "distilled"]) == {"best", "welch"}


def test_equivalence_class_shares_a_rank(paired_store):
    engine, ids = paired_store
    lb = R.leaderboard(engine, SUITE, "rougeL")
    assert list(lb.setting) == ["teacher", "student-init", CSD_SS, RKL, KL, CE]
    # rkl ∥ csd(S,S) (cosine 0.99999); rkl − csd(S,S) = -0.1 ± 1.5 → not separated: both rank 1
    assert [int(row(lb, s)["rank"]) for s in (CSD_SS, RKL, KL, CE)] == [1, 1, 3, 4]
    assert (row(lb, CSD_SS).equiv_class, row(lb, RKL).equiv_class, row(lb, KL).equiv_class) == ("∥1", "∥1", "")
    assert bool(row(lb, RKL).tied_with_best) and row(lb, RKL).p_vs_best > 0.5
    assert (row(lb, RKL).delta_vs_best_lo, row(lb, RKL).delta_vs_best_hi) == (pytest.approx(-0.85),
                                                                            pytest.approx(0.65))
    (c,) = lb.attrs["classes"]
    assert c["shared_rank"] and c["members"] == [CSD_SS, RKL] and c["run_id"] == ids["analysis"]
    assert c["reason"] == (f"{CSD_SS} ∥ rkl: same direction, gradient ×2.00 — under AdamW at most an effective "
                           "learning-rate factor")
    # kl − csd(S,S) has cosine 0.9998 < 0.9999: no class
    assert all(KL not in k["members"] for k in R.gradient_classes(engine, SUITE))


def test_band_and_ce(paired_store):
    engine, _ = paired_store
    lb = R.leaderboard(engine, SUITE, "rougeL")
    csd = row(lb, CSD_SS)
    # (30.5 − 10, 29.5 − 10) out of 40 − 10 on seeds 0, 1; prompts and sampling seeds cancel
    assert (csd.band_recovered, csd.band_lo, csd.band_hi) == (pytest.approx(200 / 3), pytest.approx(65.0),
                                                              pytest.approx(205 / 3))
    b = R.band_recovered(engine, SUITE, "1", CSD_SS, PAIRED_TASK, "rougeL")
    assert (b["mean"], b["lo"], b["hi"]) == (pytest.approx(200 / 3), pytest.approx(65.0), pytest.approx(205 / 3))
    assert row(lb, CE).band_recovered == pytest.approx(50.0)
    # distillation vs fine-tuning on the data (ce): every setting better, ce itself the baseline
    assert lb.attrs["ce"] == CE
    assert [row(lb, s).vs_ce for s in (CSD_SS, RKL, KL, CE)] == ["better", "better", "better", "ce"]
    assert (csd.delta_vs_ce, csd.delta_vs_ce_lo, csd.delta_vs_ce_hi) == pytest.approx((5.0, 5.0, 5.0))
    assert row(lb, KL).p_vs_ce == pytest.approx(P_FLOOR)
    # teacher − student-init: a reference pair is paired too (one observation each)
    r = R.paired_difference(engine, SUITE, "1", "teacher", "student-init", PAIRED_TASK, "rougeL")
    assert (r["mean"], r["lo"], r["hi"], r["n_train_seeds"]) == (pytest.approx(30.0), pytest.approx(30.0),
                                                                  pytest.approx(30.0), 1)
    # a setting vs a reference row: the reference is paired with every training seed of the setting
    r = R.paired_difference(engine, SUITE, "1", CSD_SS, "teacher", PAIRED_TASK, "rougeL")
    assert (r["mean"], r["lo"], r["hi"], r["n_train_seeds"]) == (pytest.approx(-10.0), pytest.approx(-10.5),
                                                                  pytest.approx(-9.5), 2)


def test_readme_markdown(paired_store):
    engine, _ = paired_store
    md = R.leaderboard_markdown(engine, SUITE, "rougeL")
    lines = md.splitlines()
    assert lines[0] == ("| Setting | chatterbot | Rank | Δ vs best [95% CI] | vs ce [95% CI] | Band % [95% CI] | "
                        "Class | Seeds |")
    rows_ = {cells(x)[0]: cells(x) for x in lines[2:8]}
    assert rows_[CSD_SS] == [CSD_SS, "**30.00 ± 2.87**", "1", "best", "better +5.00 [+5.00, +5.00]",
                             "66.7 [65.0, 68.3]", "∥1", "2 (+1 repeat)"]
    assert rows_["rkl ≈"][:5] == ["rkl ≈", "29.90 ± 2.87", "1", "-0.10 [-0.85, +0.65]", "better +4.90 [+4.15, +5.65]"]
    assert rows_["kl"][:5] == ["kl", "29.50 ± 2.87", "3", "-0.50 [-0.60, -0.40]", "better +4.50 [+4.40, +4.60]"]
    assert rows_["ce"] == ["ce", "25.00 ± 2.87", "4", "-5.00 [-5.00, -5.00]", "(fine-tuning baseline)",
                           "50.0 [48.3, 51.7]", "", "2 (+1 repeat)"]
    assert "Smallest resolvable difference in rougeL on chatterbot: " in md and "over 6 pairs of distilled" in md
    assert "Not separated by the paired test: one shared rank." in md


def test_show_prints_paired_comparisons(paired_store):
    from kdbench.report import describe_run

    engine, ids = paired_store
    out = describe_run(engine, ids[CSD_SS][0])
    assert (f"gradient class: {CSD_SS} ∥ rkl: same direction, gradient ×2.00 — under AdamW at most an effective "
            f"learning-rate factor (analysis run {ids['analysis']})") in out
    assert f"repeats: runs #{ids[CSD_SS][0]}, #{ids[CSD_SS][1]} are one experiment (config_hash h-csd(tau=1.0,w1)" in out
    # this run (seed 0, offset -0.3): 30.2 vs teacher 40 and student-init 10, on every prompt and sampling seed
    assert (f"  vs teacher (run {ids['teacher'][0]}): -9.80 [-9.80, -9.80], p ≤ 0.001 (paired, 12 prompts × 1 "
            "training seed)") in out
    assert f"  vs student-init (run {ids['student-init'][0]}): +20.20 [+20.20, +20.20]" in out
    assert "  teacher − undistilled band recovered: 67.3 % [67.3, 67.3]" in out
    assert "  smallest resolvable difference on this suite: " in out
    kl = describe_run(engine, ids[KL][0])
    assert "gradient class" not in kl and "repeats:" not in kl and "vs teacher" in kl
    assert "vs teacher" not in describe_run(engine, ids["teacher"][0])
    assert "run " in describe_run(engine, ids["analysis"])
