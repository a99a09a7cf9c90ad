"""The Streamlit leaderboard app, headless (streamlit.testing AppTest), on the fixture store.

Expected numbers: see tests/fixtures_store.py and the derivations in tests/test_results.py
(kl on micro/test: mean 22, ± 1.484126; csd(T,S) best on the average, csd(S,S) ≈ best by the paired test),
and on the paired store (build_paired_store: repeats, an equivalence class sharing rank 1, a ce row).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

try:
    from tests.fixtures_store import (ARITH, CE, CHATTERBOT, CSD_SS, CSD_TS, FAIL_REASON, KL, QUICK, RKL, TEST,
                                      build_fixture_store, build_paired_store, build_versions_store)
    from tests.store_helpers import store_location
except ImportError:  # tests/ itself on sys.path
    from fixtures_store import (ARITH, CE, CHATTERBOT, CSD_SS, CSD_TS, FAIL_REASON, KL, QUICK, RKL, TEST,
                                build_fixture_store, build_paired_store, build_versions_store)
    from store_helpers import store_location

from kdbench.store import RunWriter, open_engine

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # leaderboard_app is imported below (the app adds ROOT itself)
    sys.path.insert(0, str(ROOT))
APP = str(ROOT / "leaderboard_app" / "app.py")
H6 = 1.4841263


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = store_location(tmp_path_factory.mktemp("appstore"))
    ids = build_fixture_store(path)
    return path, ids


@pytest.fixture
def ids(store_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_DB", str(store_path[0]))
    return store_path[1]


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    if page is not None:
        at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def table(at: AppTest, *columns: str):
    """The first st.dataframe showing all these columns (read-only tables carry no key in AppTest)."""
    for d in at.dataframe:
        if set(columns) <= set(d.value.columns):
            return d.value
    raise AssertionError(f"no table with columns {columns}: {[list(d.value.columns) for d in at.dataframe]}")


def texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def row(df, setting: str):
    hit = df[df.Setting == setting]
    assert len(hit) == 1, list(df.Setting)
    return hit.iloc[0]


# ---------------------------------------------------------------------------- leaderboard


def test_leaderboard_page(ids):
    at = start()
    assert at.title[0].value == "Leaderboard"
    assert at.selectbox(key="lb_suite").value == "micro" and at.selectbox(key="lb_version").value == "1"
    assert at.selectbox(key="lb_metric").value == "rougeL"
    assert at.selectbox(key="lb_metric").options[:2] == ["rougeL", "accuracy"]
    df = table(at, "Setting", "Rank")
    assert list(df.Setting) == ["teacher", "student-init", CSD_TS, CSD_SS, KL, RKL]
    assert list(df.Role[:2]) == ["reference", "reference"] and set(df.Role[2:]) == {"distilled"}
    kl = row(df, KL)
    assert kl[TEST] == pytest.approx(22.0) and kl[f"{TEST} ±"] == pytest.approx(H6, abs=1e-6)
    assert kl["Average"] == pytest.approx(31.0) and kl["Rank"] == 3 and kl["vs best"] == ""
    assert (kl["Wall time (s)"], kl["Train tok/s"], kl["Peak mem (MB)"]) == (105.0, 2050.0, 905.0)
    assert row(df, CSD_TS)["vs best"] == "★ best" and row(df, CSD_SS)["vs best"] == "≈ best"
    assert row(df, "teacher")[TEST] == 30.0 and row(df, "student-init")[TEST] == 10.0
    # paired columns: Δ vs best with its CI, p, the gradient class, the band, seeds and repeats
    assert row(df, KL)["Δ vs best"] == pytest.approx(-2.25) and row(df, KL)["Δ CI"].startswith("[-2.")
    assert row(df, CSD_SS)["p vs best"] > 0.05 and row(df, KL)["p vs best"] < 0.01
    assert (row(df, CSD_SS)["Class"], row(df, RKL)["Class"], row(df, KL)["Class"]) == ("∥1", "∥1", "")
    assert row(df, CSD_TS)["Band %"] == pytest.approx(73.0) and (kl["Seeds"], kl["Repeats"]) == (2, 0)
    # failed run reported (count + reason), running run mentioned, equivalence class and resolution shown
    assert any("1 failed run(s)" in w.value for w in at.warning)
    failed = at.expander[-1]
    assert FAIL_REASON in set(failed.dataframe[0].value.error)
    captions = " ".join(c.value for c in at.caption)
    assert "1 run(s) of this suite still running" in captions
    assert (f"Equivalence class ∥1: {CSD_SS} ∥ rkl: same direction, gradient ×2.00 — under AdamW at most an "
            "effective learning-rate factor") in captions and "ranked apart" in captions
    assert "Smallest resolvable difference in rougeL on the mean over 2 tasks: " in captions
    assert "paired bootstrap on the per-sample `rougeL` scores" in captions
    # downloads and the paper-style table
    assert [b.label for b in at.get("download_button")] == ["Download Markdown", "Download CSV"]
    md = at.code[0].value
    assert f"| {CSD_TS} | **42.00 ± 1.48** | 24.50 ± 1.48 | **33.25 ± 1.48** | 1 | best |" in md
    assert "Smallest resolvable difference" in md


def test_leaderboard_selectors(ids):
    at = start()
    at.selectbox(key="lb_task").select(TEST).run()
    df = table(at, "Setting", "Rank")
    assert "Average" not in df.columns and ARITH not in df.columns
    assert row(df, CSD_SS)["Rank"] == 1 and row(df, CSD_TS)["vs best"] == "≈ best"
    assert "accuracy" not in at.selectbox(key="lb_metric").options  # micro/test has no accuracy

    at.selectbox(key="lb_metric").select("self_bleu").run()  # lower is better
    df = table(at, "Setting", "Rank")
    assert row(df, KL)[TEST] == 30.0 and row(df, KL)["Rank"] == 1 and row(df, KL)["vs best"] == "★ best"
    assert row(df, CSD_SS)["Rank"] == 4
    assert any("self_bleu: lower is better" in c.value for c in at.caption)

    at.selectbox(key="lb_task").select(ARITH).run()
    at.selectbox(key="lb_metric").select("accuracy").run()
    df = table(at, "Setting", "Rank")
    assert row(df, CSD_TS)[ARITH] == 50.0 and row(df, "teacher")[ARITH] == 60.0

    at.selectbox(key="lb_version").select("0").run()  # the stale suite version: only its own run
    at.selectbox(key="lb_task").select(TEST).run()
    at.selectbox(key="lb_metric").select("rougeL").run()
    df = table(at, "Setting", "Rank")
    assert list(df.Setting) == [KL] and df.iloc[0][TEST] == 99.0
    assert not at.exception


def test_on_policy_rows_can_be_shown_by_sampler(store_path, tmp_path, monkeypatch):
    """Runs made with --sampler are rows of their own (``kl+imitkd``); a "Sampler" choice shows
    one sampler's rows (references kept), and appears only where such rows exist."""
    from sqlalchemy import insert, select, update

    from kdbench.store import Artifact, Run, open_engine

    monkeypatch.setenv("KDBENCH_DB", str(store_path[0]))  # the module's store: no on-policy rows
    plain = start()
    assert "lb_sampler" not in [s.key for s in plain.selectbox]
    assert "Generation (s)" not in table(plain, "Setting", "Rank").columns
    path = store_location(tmp_path)
    build_fixture_store(path)
    engine = open_engine(str(path))
    with engine.begin() as c:
        c.execute(update(Run).where(Run.setting == KL).values(setting=KL + "+imitkd"))
        ids = c.execute(select(Run.id).where(Run.setting == KL + "+imitkd", Run.status == "finished")).scalars().all()
        for run_id in ids:  # what an on-policy run's cost artifact holds of its sampling
            c.execute(insert(Artifact).values(run_id=run_id, name="cost", data={
                "sampler_student_steps": 50, "sampler_generation_s": 80.0,
                "sampler_generated_tokens_per_s": 60.0, "teacher_scoring_s": 12.0}))
    engine.dispose()
    monkeypatch.setenv("KDBENCH_DB", str(path))
    at = start()
    assert at.selectbox(key="lb_sampler").options == ["all", "off", "imitkd"]
    df = table(at, "Setting", "Rank")
    assert KL + "+imitkd" in set(df.Setting)
    # the cost columns say what sampling the student cost (the mean of the row's runs), blank elsewhere
    row = df[df.Setting == KL + "+imitkd"].iloc[0]
    assert ids and row["Generation (s)"] == 80.0 and row["Gen tok/s"] == 60.0 and row["Scoring (s)"] == 12.0
    assert df[df.Setting == CSD_SS]["Generation (s)"].isna().all()
    at.selectbox(key="lb_sampler").select("imitkd").run()
    shown = set(table(at, "Setting", "Rank").Setting)
    assert KL + "+imitkd" in shown and CSD_SS not in shown and {"teacher", "student-init"} <= shown
    at.selectbox(key="lb_sampler").select("off").run()
    shown = set(table(at, "Setting", "Rank").Setting)
    assert KL + "+imitkd" not in shown and CSD_SS in shown
    assert not at.exception


def test_standard_and_quick_versions(tmp_path, monkeypatch):
    path = tmp_path / "versions.db"
    ids = build_versions_store(path)
    monkeypatch.setenv("KDBENCH_DB", str(path))
    at = start()
    version = at.selectbox(key="lb_version")
    assert version.value == "1" and version.options == ["1 (standard)", f"{QUICK} (quick)"]
    assert not at.warning
    assert list(table(at, "Setting", "Rank").Setting) == ["teacher", "student-init", KL]
    version.select(QUICK).run()
    assert any(f"{QUICK}` holds quick runs (steps=3, eval_limit=3)" in w.value for w in at.warning)
    df = table(at, "Setting", "Rank")
    assert list(df.Setting) == ["teacher", "student-init", RKL, KL] and row(df, KL)[CHATTERBOT] == 6.0
    # run detail opens on the standard version's distilled run; seed-free metrics are explained
    at = start("Run detail")
    assert at.subheader[0].value == f"Run #{ids[('1', KL)]}: {KL}"
    assert any(c.value.startswith("fkl_tok, self_bleu_across_seeds: one value per run") for c in at.caption)
    assert "kl says\n\nsomething" in texts(at)  # blank lines of a sampled output collapsed
    assert any("length 3 · degenerate no" in m.value for m in at.markdown)


def test_standard_version_without_distilled_runs(tmp_path, monkeypatch):
    path = tmp_path / "refs.db"
    build_versions_store(path, standard_distilled=False)
    monkeypatch.setenv("KDBENCH_DB", str(path))
    at = start()
    assert at.selectbox(key="lb_version").value == "1"
    assert any("No distilled run of micro v1 has finished yet" in i.value and QUICK in i.value for i in at.info)
    assert list(table(at, "Setting", "Rank").Setting) == ["teacher", "student-init"]


# ---------------------------------------------------------------------------- other pages


def test_fidelity_page(ids):
    at = start("Fidelity vs diversity")
    at.selectbox(key="fd_task").select(TEST).run()
    df = table(at, "Setting", "rougeL")
    kl = row(df, KL)
    assert (kl.rougeL, kl.self_bleu) == (22.0, 30.0) and kl["rougeL ±"] == pytest.approx(H6, abs=1e-6)
    assert {"teacher", "student-init"} <= set(df.Setting)
    spec = json.dumps(charts(at)[0])
    assert "Self-BLEU (lower = more diverse)" in spec and '"mark": {"type": "rule"' in spec.replace("'", '"')
    at.radio(key="fd_diversity").set_value("distinct_2").run()
    assert "distinct-2 (higher = more diverse)" in json.dumps(charts(at)[0])
    assert not at.exception


def test_run_detail_page(ids):
    at = start("Run detail")
    at.selectbox(key="rd_run").select(ids[KL][0]).run()
    assert at.subheader[0].value == f"Run #{ids[KL][0]}: {KL}"
    s = table(at, "n_seeds")
    r = s[(s.task == TEST) & (s.metric == "rougeL")].iloc[0]
    assert (r["mean"], r["std"], r.n_seeds) == (21.0, 1.0, 3)
    per_seed = table(at, "seed 10")
    assert list(per_seed[(per_seed.task == TEST) & (per_seed.metric == "rougeL")].iloc[0][["seed 10", "seed 30"]]) \
        == [20.0, 22.0]
    assert at.json[0].value and json.loads(at.json[0].value)["reference_fingerprint"] == "fp-micro-1"
    assert json.loads(at.json[1].value)["git_commit"] == "0123abcd"
    assert len(charts(at)) == 2  # loss, objective terms
    # samples beside reference and the teacher's response to the same prompt and seed
    at.selectbox(key="rd_task").select(ARITH).run()
    at.selectbox(key="rd_seed").select(20).run()
    shown = texts(at)
    assert "kl (train seed 1) answer to micro/arith p00, sampling seed 20." in shown
    assert "teacher answer to micro/arith p00, sampling seed 20." in shown
    assert "• #### 12\n• The answer is 12." in shown
    at.number_input(key="rd_page").set_value(2).run()
    assert "teacher answer to micro/arith p10, sampling seed 20." in texts(at)
    # a failed run shows its error
    at.selectbox(key="rd_run").select(ids["failed"]).run()
    assert any(FAIL_REASON in e.value for e in at.error)


def test_compare_page(ids):
    at = start("Compare")
    assert (at.selectbox(key="cmp_a").value, at.selectbox(key="cmp_b").value) == (CSD_TS, CSD_SS)  # best two
    at.selectbox(key="cmp_a").select(KL).run()
    at.selectbox(key="cmp_b").select(RKL).run()
    df = table(at, "Δ (A − B)").set_index("Task")
    arith = df.loc[ARITH]
    assert (arith.A, arith.B, arith["Δ (A − B)"]) == (40.0, 38.0, 2.0)
    # paired: 2 ± 1.96 · 0.516 (Welch said 2 ± 1.82)
    assert arith["Δ CI low"] == pytest.approx(0.99, abs=0.08) and arith.Better == "A (kl)"
    assert (arith.Test, arith.Prompts, arith["Training seeds"]) == ("paired bootstrap", 20, 2)
    assert arith["Resolvable Δ"] > 0
    assert df.loc[TEST]["Δ (A − B)"] == pytest.approx(-1.0)
    assert df.loc["Average"]["Δ (A − B)"] == pytest.approx(0.5) and df.loc["Average"].Better.startswith("≈")
    assert any("Resolvable Δ: the smallest difference this suite version resolves" in c.value for c in at.caption)
    at.selectbox(key="cmp_task").select(TEST).run()
    heads = [m.value for m in at.markdown if m.value.startswith("**p")]
    assert heads[0] == "**p00** · A 20.10 · B 24.90 · Δ -4.80"
    assert "kl (train seed 1) answer to micro/test p00, sampling seed 10." in texts(at)
    assert "rkl (train seed 1) answer to micro/test p00, sampling seed 10." in texts(at)
    # individual runs
    at.radio(key="cmp_by").set_value("runs").run()
    at.selectbox(key="cmp_a").select(f"run:{ids[KL][0]}").run()
    at.selectbox(key="cmp_b").select(f"run:{ids['teacher']}").run()
    df = table(at, "Δ (A − B)").set_index("Task")
    assert df.loc[TEST]["Δ (A − B)"] == pytest.approx(-9.0) and df.loc[TEST].Better.startswith("B")
    assert df.loc[TEST]["Training seeds"] == 1
    assert any("One training seed: the paired test compares these trained models" in c.value for c in at.caption)
    assert not at.exception


@pytest.fixture
def paired_ids(tmp_path_factory, monkeypatch):
    path = store_location(tmp_path_factory.mktemp("pairedapp"))
    ids = build_paired_store(path)
    monkeypatch.setenv("KDBENCH_DB", str(path))
    return ids


def test_paired_store_pages(paired_ids):
    at = start()
    df = table(at, "Setting", "Rank")
    assert list(df.Setting) == ["teacher", "student-init", CSD_SS, RKL, KL, CE]
    # csd(S,S) ∥ rkl not separated by the paired test: one class, one rank; kl separated (Welch would tie it)
    assert [row(df, s)["Rank"] for s in (CSD_SS, RKL, KL, CE)] == [1, 1, 3, 4]
    assert [row(df, s)["vs best"] for s in (CSD_SS, RKL, KL)] == ["★ best", "≈ best", ""]
    assert (row(df, CSD_SS)["Class"], row(df, RKL)["Class"]) == ("∥1", "∥1")
    assert (row(df, CSD_SS)["Seeds"], row(df, CSD_SS)["Repeats"], row(df, CE)["Repeats"]) == (2, 1, 1)
    assert row(df, CSD_SS)["vs ce"] == "better (+5.00)" and row(df, CE)["vs ce"] == "(baseline)"
    assert row(df, CSD_SS)["Band %"] == pytest.approx(200 / 3) and row(df, CSD_SS)["Band CI"] == "[65.0, 68.3]"
    captions = " ".join(c.value for c in at.caption)
    assert "Not separated by the paired test: one shared rank." in captions
    # the run picker marks repeats; run detail says which runs are one experiment, and the class
    at = start("Run detail")
    labels = at.selectbox(key="rd_run").options  # formatted labels
    assert sum("×2 (repeats)" in x for x in labels) == 4  # csd(S,S) seed 0 and ce seed 1, two runs each
    at.selectbox(key="rd_run").select(paired_ids[CSD_SS][0]).run()
    captions = [c.value for c in at.caption]
    assert any(c.startswith(f"Repeats: runs #{paired_ids[CSD_SS][0]}, #{paired_ids[CSD_SS][1]} are one experiment")
               for c in captions)
    assert any(c.startswith(f"Gradient class ∥1: {CSD_SS} ∥ rkl") for c in captions)
    # compare: kl vs csd(S,S) is separated by the paired test
    at = start("Compare")
    at.selectbox(key="cmp_a").select(KL).run()
    at.selectbox(key="cmp_b").select(CSD_SS).run()
    r = table(at, "Δ (A − B)").iloc[0]
    assert r["Δ (A − B)"] == pytest.approx(-0.5) and r.Better == f"B ({CSD_SS})" and r.Test == "paired bootstrap"
    assert (r["Δ CI low"], r["Δ CI high"]) == (pytest.approx(-0.6), pytest.approx(-0.4))
    assert not at.exception


def test_objectives_page(ids):
    at = start("Objectives")
    cat = table(at, "summary")
    assert {"csd", "kl", "rkl"} <= set(cat.name)
    # aliases as `kdbench list` writes them, not as Python dicts
    csd_aliases = cat[cat.name == "csd"].iloc[0].aliases
    assert "csd_ts = csd(w1=T,w2=S)" in csd_aliases.split(", ") and "{" not in csd_aliases
    spec = json.dumps(charts(at)[0])
    assert "cosine" in spec
    assert any(c.value.startswith(f"Equivalence class ∥1: {CSD_SS} ∥ rkl: same direction, gradient ×2.00")
               for c in at.caption)
    at.radio(key="obj_matrix").set_value("norm_ratio").run()
    assert "norm ratio" in json.dumps(charts(at)[0])


def test_objectives_page_without_registry(ids, monkeypatch):
    from leaderboard_app.views import objectives
    objectives.catalogue.clear()
    monkeypatch.setitem(sys.modules, "kdbench.registry", None)  # import fails
    try:
        at = start("Objectives")
        assert any("catalogue is unavailable" in i.value for i in at.info)
        assert charts(at), "the gradient-similarity heatmap still shows"
    finally:
        objectives.catalogue.clear()


# ---------------------------------------------------------------------------- store states


def _failed_only(path: Path) -> None:
    engine = open_engine(str(path))
    RunWriter.start(engine, role="distilled", suite="micro", suite_version="1", seed=1, config={}, provenance={},
                    objective="kl", setting=KL).fail("CUDA out of memory")
    engine.dispose()


@pytest.mark.parametrize("kind,message", [
    ("missing", "No results to show: no run store at"),
    ("empty_file", "has no kdbench tables yet"),
    ("schema_only", "has no runs yet"),
    ("failed_only", "No finished runs yet"),
])
def test_unusual_stores_give_a_message(tmp_path, monkeypatch, kind, message):
    path = tmp_path / "runs.db"
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "schema_only":
        open_engine(str(path)).dispose()
    elif kind == "failed_only":
        _failed_only(path)
    monkeypatch.setenv("KDBENCH_DB", str(path))
    for page in ("Leaderboard", "Compare", "Fidelity vs diversity"):
        at = start(None if page == "Leaderboard" else page)
        assert any(message in i.value for i in at.info), [i.value for i in at.info]
        if kind == "failed_only":
            assert any("1 failed run(s)" in w.value for w in at.warning)
            assert "CUDA out of memory" in set(at.expander[0].dataframe[0].value.error)
    if kind == "missing":
        assert not path.exists(), "the app must not create the store"


def test_db_location_argument(monkeypatch):
    from leaderboard_app.common import db_location
    monkeypatch.setenv("KDBENCH_DB", "env.db")
    assert db_location(["--db", "arg.db"]) == "arg.db"
    assert db_location(["--db=sqlite:///x.db", "--other", "1"]) == "sqlite:///x.db"
    assert db_location([]) == "env.db"
    monkeypatch.delenv("KDBENCH_DB")
    assert db_location(["-q", "--durations=5"]) == "runs.db"
