"""kdbench.results for one run and for comparisons between rows, on the fixture store: every
expected number worked out by hand from the closed forms in tests/fixtures_store.py (the
constants and the paired closed forms are derived in tests/test_results.py's docstring)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import text

from kdbench import results as R

try:
    from tests.fixtures_store import ARITH, CSD_SS, CSD_TS, FAIL_REASON, KL, RKL, SUITE, TEST
    from tests.results_helpers import (H3, H6, P_FLOOR, PLUG_IN, SD_P, Z, cells, normal_p, row,  # noqa: F401
                                       store)  # store: a module fixture
except ImportError:  # tests/ itself on sys.path
    from fixtures_store import ARITH, CSD_SS, CSD_TS, FAIL_REASON, KL, RKL, SUITE, TEST
    from results_helpers import H3, H6, P_FLOOR, PLUG_IN, SD_P, Z, cells, normal_p, row, store  # noqa: F401


# ---------------------------------------------------------------------------- one run


def test_run_summary(store):
    engine, ids, _ = store
    s = R.run_summary(engine, ids[KL][0])  # kl, training seed 1: offsets -1 + {-1, 0, 1}
    assert list(s.columns) == ["task", "metric", "mean", "std", "ci_lo", "ci_hi", "n_seeds"]
    r = s[(s.task == TEST) & (s.metric == "rougeL")].iloc[0]
    assert (r["mean"], r["std"], r.n_seeds) == (21.0, 1.0, 3)
    assert (r.ci_lo, r.ci_hi) == (pytest.approx(21 - H3, abs=1e-6), pytest.approx(21 + H3, abs=1e-6))
    acc = s[(s.task == ARITH) & (s.metric == "accuracy")].iloc[0]
    assert (acc["mean"], acc["std"]) == (35.0, 5.0)
    assert len(s) == 10 + 9  # arith: 10 metrics, test: 9 (no accuracy)
    wide = R.run_metrics(engine, ids[KL][0])
    w = wide[(wide.task == TEST) & (wide.metric == "rougeL")].iloc[0]
    assert (w["seed 10"], w["seed 20"], w["seed 30"]) == (20.0, 21.0, 22.0)


def test_run_detail_and_teacher(store):
    engine, ids, _ = store
    d = R.run_detail(engine, ids[CSD_SS][1])
    assert d["setting"] == CSD_SS and d["status"] == "finished" and d["seed"] == 2
    assert d["params"] == {"tau": 1.0, "w1": "S", "w2": "S"}
    assert d["config"]["reference_fingerprint"] == "fp-micro-1" and d["provenance"]["git_commit"] == "0123abcd"
    assert d["selected_step"] == 100 and d["selection_rule"] == "max valid rougeL"
    assert d["teacher_run_id"] == ids["teacher"]
    assert (d["n_curve"], d["n_samples"], d["n_metrics"]) == (8, 120, 57)
    assert R.run_detail(engine, 10_000) is None
    assert R.run_detail(engine, ids["failed"])["error"] == FAIL_REASON
    assert R.teacher_run_for(engine, ids["stale"]) is None  # no teacher in suite version 0


def test_curves(store):
    engine, ids, _ = store
    c = R.curves(engine, ids[KL][0])
    assert c.attrs["terms"] == ["kl", "rougeL"]
    train, valid = c[c.split == "train"], c[c.split == "valid"]
    assert list(train.step) == [0, 20, 40, 60, 80, 100] and list(valid.step) == [50, 100]
    assert train.iloc[0].loss == pytest.approx(2.1) and train.iloc[0]["kl"] == pytest.approx(2.1)
    assert list(valid.rougeL) == [20.0, 21.0]  # 22 - 100/step
    csd = R.curves(engine, ids[CSD_SS][0])
    assert set(csd.attrs["terms"]) >= {"var_w1", "var_w2", "mean_gap_sq"}
    assert R.curves(engine, ids["teacher"]).empty


def test_samples_with_teacher_and_paging(store):
    engine, ids, _ = store
    run = ids[KL][0]
    assert R.count_samples(engine, run) == 120 and R.count_samples(engine, run, ARITH, 20) == 20
    assert R.sample_seeds(engine, run, ARITH) == [10, 20, 30] and R.sample_tasks(engine, run) == [ARITH, TEST]
    s = R.samples(engine, run, ARITH, 20, limit=3)
    assert list(s.prompt_id) == ["p00", "p01", "p02"]
    first = s.iloc[0]
    assert first.references == ["#### 12", "The answer is 12."]
    assert first.teacher_output == "teacher answer to micro/arith p00, sampling seed 20."
    assert first.output == "kl (train seed 1) answer to micro/arith p00, sampling seed 20."
    assert first.rougeL == pytest.approx(37.1)  # 40 - 1 + 0 + 0.2·(0 - 9.5)
    assert first.accuracy == 100.0  # 35 % of 20 prompts: p00..p06 correct
    page = R.samples(engine, run, ARITH, 20, limit=2, offset=6)
    assert list(page.prompt_id) == ["p06", "p07"] and list(page.accuracy) == [100.0, 0.0]
    t = R.samples(engine, run, TEST, 10, limit=1)
    assert t.iloc[0].references == ["Reference answer 00: explain why the sky is blue."]
    no_teacher = R.samples(engine, run, limit=1, with_teacher=False)
    assert no_teacher.iloc[0].teacher_output is None
    assert R.score_names(engine, SUITE, ARITH) == ["rougeL", "accuracy"]


# ---------------------------------------------------------------------------- comparisons


def test_compare_settings(store):
    engine, _, _ = store
    c = R.compare(engine, SUITE, KL, RKL, "rougeL").set_index("task")
    assert list(c.index) == [ARITH, TEST, R.AVERAGE]
    se = 0.4 * SD_P * PLUG_IN  # kl − rkl: ΔSLOPE 0.4 on both tasks
    a = c.loc[ARITH]  # 40 vs 38: d = 2 + 0.4(p - 9.5) → paired CI 2 ± 1.96 · 0.516; Welch had 2 ± 1.82
    assert (a.mean_a, a.mean_b, a.delta, a.test) == (40.0, 38.0, 2.0, "paired bootstrap")
    assert a.delta_lo == pytest.approx(2 - Z * se, abs=0.08) and a.delta_hi == pytest.approx(2 + Z * se, abs=0.08)
    assert a.p_value == pytest.approx(P_FLOOR) and a.better == "a"
    assert (a.n_prompts, a.n_train_seeds) == (20, 2)
    t = c.loc[TEST]  # 22 vs 23: z = 1.94 — Welch said p 0.249, the paired test p ≈ 0.05
    assert t.delta == pytest.approx(-1.0) and t.p_value == pytest.approx(normal_p(1.0 / se), abs=0.03)
    avg = c.loc[R.AVERAGE]  # d = 0.5 + 0.4(p - 9.5) on both tasks: SE halves by sqrt(2)
    assert avg.delta == pytest.approx(0.5) and avg.n_prompts == 40
    assert avg.p_value == pytest.approx(normal_p(0.5 / (se / math.sqrt(2))), abs=0.03) and avg.better == "≈"
    sb = R.compare(engine, SUITE, KL, RKL, "self_bleu", [TEST]).iloc[0]  # 30 vs 45, lower is better: Welch
    assert sb.delta == -15.0 and sb.better == "a" and sb.test == "welch" and sb.n_prompts == 0


def test_compare_run_against_reference(store):
    engine, ids, _ = store
    c = R.compare(engine, SUITE, f"run:{ids[KL][0]}", "teacher", "rougeL", [TEST]).iloc[0]
    # run: 20, 21, 22 (mean 21); teacher 29, 30, 31; paired: d = -9 + 0.2(p - 9.5) on every sampling seed
    assert (c.mean_a, c.mean_b, c.n_a, c.n_b, c.delta) == (21.0, 30.0, 3, 3, -9.0)
    se = 0.2 * SD_P * PLUG_IN
    assert c.delta_lo == pytest.approx(-9 - Z * se, abs=0.05) and c.delta_hi == pytest.approx(-9 + Z * se, abs=0.05)
    assert c.better == "b" and (c.n_prompts, c.n_train_seeds) == (20, 1)


def test_paired_difference_and_resolution(store):
    engine, ids, _ = store
    r = R.paired_difference(engine, SUITE, "1", CSD_SS, CSD_TS, TEST, "rougeL")
    assert r["mean"] == pytest.approx(0.5) and r["score"] == "rougeL" and r["tasks"] == [TEST]
    assert r["se"] == pytest.approx(0.4 * SD_P * PLUG_IN, rel=0.06) and r["better"] == "≈" and r["defined"]
    assert (r["n_prompts"], r["n_train_seeds"], r["n_cells"], r["train_seeds"]) == (20, 2, 120, [1, 2])
    both = R.paired_difference(engine, SUITE, None, CSD_SS, CSD_TS, None, "rougeL")  # every task: their mean
    assert both["mean"] == pytest.approx(-0.25) and both["tasks"] == [ARITH, TEST]
    acc = R.paired_difference(engine, SUITE, "1", "teacher", "student-init", ARITH, "accuracy")
    assert acc["mean"] == pytest.approx(40.0) and acc["better"] == "a" and acc["n_train_seeds"] == 1
    none = R.paired_difference(engine, SUITE, "1", KL, RKL, TEST, "self_bleu")  # no per-sample score
    assert not none["defined"] and none["reason"] == "no aligned per-sample scores"
    assert R.score_key("mean_length") == "length" and R.score_key("degenerate_frac_sampled") == "degenerate_sampled"
    # resolution on micro/test: 6 pairs of distilled settings, ΔSLOPE .4 .2 .2 .6 .2 .4 → mean ΔSLOPE² = 0.8/6
    res = R.resolution(engine, SUITE, "1", TEST, "rougeL")
    assert (res["n_pairs"], res["basis"], res["n_prompts"], res["n_train_seeds"]) == (
        6, "pairs of distilled settings", 20, 2)
    assert res["value"] == pytest.approx(Z * SD_P * PLUG_IN * math.sqrt(0.8 / 6), rel=0.05)
    assert len(res["pairs"]) == 6 and set(res["pairs"].columns) >= {"a", "b", "se"}
    assert math.isnan(R.resolution(engine, SUITE, "1", TEST, "self_bleu")["value"])
    assert "csd" not in R.describe_difference(r) and R.describe_difference(r).startswith("+0.50 [")


def test_prompts_differing_most(store):
    engine, ids, _ = store
    d = R.prompts_differing_most(engine, SUITE, KL, RKL, TEST, "rougeL", limit=3)
    # per prompt: kl 22 + 0.2(p - 9.5), rkl 23 - 0.2(p - 9.5) → diff = -1 + 0.4(p - 9.5), largest |.| at p00
    assert list(d.prompt_id) == ["p00", "p01", "p02"]
    assert list(d["diff"]) == pytest.approx([-4.8, -4.4, -4.0])
    assert list(d.score_a) == pytest.approx([20.1, 20.3, 20.5]) and list(d.score_b) == pytest.approx([24.9, 24.7, 24.5])
    assert list(d.n_a) == [6, 6, 6]
    assert d.iloc[0].output_a == "kl (train seed 1) answer to micro/test p00, sampling seed 10."
    assert d.iloc[0].output_b == "rkl (train seed 1) answer to micro/test p00, sampling seed 10."
    assert d.iloc[0].prompt == "Explain why the sky is blue."
    acc = R.prompts_differing_most(engine, SUITE, "teacher", "student-init", ARITH, "accuracy", limit=20)
    # teacher correct on p < 11/12/13 (seeds 10/20/30), student on p < 3/4/5: diff = 100 exactly for p05..p10
    assert set(acc[acc["diff"] == 100.0].prompt_id) == {f"p{p:02d}" for p in range(5, 11)}
    assert R.prompts_differing_most(engine, SUITE, KL, RKL, TEST, "no_such_score").empty


def test_fidelity_diversity(store):
    engine, _, _ = store
    fd = R.fidelity_diversity(engine, SUITE, TEST)
    assert fd.attrs["diversity"] == ["self_bleu", "distinct_2"]
    assert list(fd.setting[:2]) == ["teacher", "student-init"]
    kl = row(fd, KL)
    assert (kl.rougeL, kl.self_bleu) == (22.0, 30.0) and kl.distinct_2 == pytest.approx(0.78)
    assert kl["rougeL ci_lo"] == pytest.approx(22 - H6, abs=1e-6)
    assert kl["distinct_2 ci95"] == pytest.approx(0.01 * H6, abs=1e-8)
    assert row(fd, "teacher").self_bleu == 28.0


def test_grad_similarity(store):
    engine, ids, _ = store
    g = R.grad_similarity(engine, SUITE)
    assert g["run_id"] == ids["analysis"] and g["names"][2] == CSD_SS
    long = R.grad_similarity_long(g)
    assert len(long) == 16
    r = long[(long.row == CSD_SS) & (long.col == RKL)].iloc[0]
    assert (r.cosine, r.norm_ratio) == (1.0, 2.0)  # ‖g_csd(S,S)‖ = 1.8 = 2 × ‖g_rkl‖
    (c,) = R.gradient_classes(engine, SUITE)
    assert c["members"] == [CSD_SS, RKL] and c["run_id"] == ids["analysis"]
    assert c["reason"] == (f"{CSD_SS} ∥ {RKL}: same direction, gradient ×2.00 — under AdamW at most an effective "
                           "learning-rate factor")
    assert R.grad_similarity(engine, "other-suite") is None


def test_to_markdown(store):
    engine, _, _ = store
    md = R.to_markdown(R.leaderboard(engine, SUITE, "rougeL"))
    lines = md.splitlines()
    assert lines[0] == (f"| Setting | {ARITH} | {TEST} | Avg. | Rank | Δ vs best [95% CI] | Band % [95% CI] | Class "
                        "| Seeds |")
    assert "| *teacher* | 50.00 ± 2.48 | 30.00 ± 2.48 | 40.00 ± 2.48 |  |  |  |  | 1 |" in lines
    rows_ = {cells(x)[0]: cells(x) for x in lines[2:8]}
    assert rows_[CSD_TS][:7] == [CSD_TS, "**42.00 ± 1.48**", "24.50 ± 1.48", "**33.25 ± 1.48**", "1", "best",
                                 rows_[CSD_TS][6]] and rows_[CSD_TS][6].startswith("73.0 [")
    assert rows_[f"{CSD_SS} ≈"][:5] == [f"{CSD_SS} ≈", "41.00 ± 1.48", "**25.00 ± 1.48**", "33.00 ± 1.48", "2"]
    assert rows_[f"{CSD_SS} ≈"][5].startswith("-0.25 [") and rows_[f"{CSD_SS} ≈"][7:] == ["∥1", "2"]
    assert rows_["kl"][:5] == ["kl", "40.00 ± 1.48", "22.00 ± 1.48", "31.00 ± 1.48", "3"]
    assert rows_["kl"][6].startswith("64.0 [") and rows_["kl"][7:] == ["", "2"]
    assert "rougeL (higher is better)" in md and "paired bootstrap over prompts" in md
    assert (f"∥1: {CSD_SS} ∥ rkl: same direction, gradient ×2.00 — under AdamW at most an effective learning-rate "
            f"factor. rkl − {CSD_SS} = -2.50 [") in md
    assert "The paired test separates them, so they are ranked apart." in md
    cost = R.to_markdown(R.leaderboard(engine, SUITE, "rougeL", [TEST]), include_cost=True)
    kl = [cells(x) for x in cost.splitlines() if x.startswith("| kl |")][0]
    assert kl[:3] == ["kl", "22.00 ± 1.48", "4"] and kl[-4:] == ["2", "105.0", "2050", "905"]
    plain = R.to_markdown(pd.DataFrame({"a": [1.234], "b": ["x|y"]}))
    assert plain.splitlines() == ["| a | b |", "| --- | --- |", "| 1.23 | x\\|y |"]


def test_queries_never_write(store):
    engine, _, path = store

    def queries():
        R.leaderboard(engine, SUITE, "rougeL")
        R.compare(engine, SUITE, KL, RKL, "rougeL")
        R.samples(engine, 3, limit=5)
        R.prompts_differing_most(engine, SUITE, KL, RKL, TEST)

    if "://" in str(path):  # a server (KDBENCH_TEST_STORE_URL): every transaction of a read-only engine is
        queries()           # READ ONLY, so queries that succeed wrote nothing; and a write is refused
        with pytest.raises(Exception, match="read-only"), engine.connect() as c:
            c.execute(text("CREATE TABLE kdbench_probe (i integer)"))
        return
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    queries()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
