"""Leaderboard page: one row per setting, mean ± 95 % CI per task and on average, rank, ≈ best, cost."""

from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from kdbench import results as R
from kdbench.results.export import class_lines, resolution_line
from leaderboard_app import common

ALL_TASKS = "All tasks"
_REF_STYLE = "background-color: rgba(120, 140, 180, 0.16)"


def display_table(lb: pd.DataFrame) -> pd.DataFrame:
    """The table as shown (and as the CSV download): numbers stay numbers."""
    tasks = lb.attrs["tasks"]
    keys = tasks + ([R.AVERAGE] if len(tasks) > 1 else [])
    out = pd.DataFrame({"Setting": lb.setting, "Role": lb.role.map(common.ROLE_LABEL).fillna(lb.role)})
    for k in keys:
        name = "Average" if k == R.AVERAGE else k
        out[name] = lb[R.stat_col(k)].astype("float64")
        out[f"{name} ±"] = lb[R.stat_col(k, "ci95")].astype("float64")
    out["Rank"] = lb["rank"]
    out["vs best"] = [
        "" if r.role != "distilled" or pd.isna(r.rank) else
        ("★ best" if r.test_vs_best == "best" else ("≈ best" if r.tied_with_best else ""))
        for r in lb.itertuples()
    ]
    out["Δ vs best"] = lb.delta_vs_best.astype("float64")
    out["Δ CI"] = [_ci(r.delta_vs_best_lo, r.delta_vs_best_hi) for r in lb.itertuples()]
    out["p vs best"] = lb.p_vs_best.astype("float64")
    if (lb.equiv_class != "").any():
        out["Class"] = lb.equiv_class
    if lb.attrs.get("ce"):
        out[f"vs {lb.attrs['ce']}"] = [_vs_ce(r) for r in lb.itertuples()]
    if lb.band_recovered.notna().any():
        out["Band %"] = lb.band_recovered.astype("float64")
        out["Band CI"] = [_ci(r.band_lo, r.band_hi, 1) for r in lb.itertuples()]
    out["Seeds"] = lb.n_runs.astype("int64")
    out["Repeats"] = lb.repeats.astype("int64")
    out["Wall time (s)"] = lb.wall_time_s.astype("float64")
    out["Train tok/s"] = lb.train_tokens_per_s.astype("float64")
    out["Peak mem (MB)"] = lb.peak_memory_mb.astype("float64")
    if lb.generation_s.notna().any():  # on-policy rows: what sampling the student cost inside training
        out["Generation (s)"] = lb.generation_s.astype("float64")
        out["Gen tok/s"] = lb.generated_tokens_per_s.astype("float64")
        out["Scoring (s)"] = lb.teacher_scoring_s.astype("float64")
    return out


def _ci(lo, hi, decimals: int = 2) -> str:
    if pd.isna(lo) or pd.isna(hi):
        return ""
    return f"[{lo:+.{decimals}f}, {hi:+.{decimals}f}]" if decimals == 2 else f"[{lo:.{decimals}f}, {hi:.{decimals}f}]"


def _vs_ce(r) -> str:
    if r.role != "distilled" or not r.vs_ce:
        return ""
    if r.vs_ce == "ce":
        return "(baseline)"
    return f"{r.vs_ce} ({r.delta_vs_ce:+.2f})" if not pd.isna(r.delta_vs_ce) else r.vs_ce


_COUNT_COLUMNS = ("Wall time (s)", "Train tok/s", "Peak mem (MB)", "Generation (s)", "Gen tok/s", "Scoring (s)")
_TEXT_COLUMNS = ("Setting", "Role", "Rank", "vs best", "Δ CI", "Class", "Band CI", "Seeds", "Repeats")


def _styled(table: pd.DataFrame):
    numeric = [c for c in table.columns if c not in _TEXT_COLUMNS and not c.startswith("vs ")]
    refs = table.Role != "distilled"
    sty = table.style.format("{:.2f}", subset=[c for c in numeric if c not in _COUNT_COLUMNS], na_rep="–")
    sty = sty.format("{:,.0f}", subset=[c for c in _COUNT_COLUMNS if c in table.columns], na_rep="–")
    sty = sty.format("{:.0f}", subset=["Rank"], na_rep="–")
    sty = sty.format("{:.4f}", subset=["p vs best"], na_rep="–")
    if "Band %" in table.columns:
        sty = sty.format("{:.1f}", subset=["Band %"], na_rep="–")
    return sty.apply(lambda row: [_REF_STYLE if refs[row.name] else ""] * len(row), axis=1)


def render(ctx: common.Ctx) -> None:
    st.title("Leaderboard")
    cols = st.columns([1.5, 3, 2, 2, 1.3])
    picked = common.suite_picker(ctx, "lb", cols[0], cols[1])
    if picked is None:
        return
    suite, version = picked
    tasks = ctx.q("list_tasks", suite, version)
    task = cols[2].selectbox("Task", [ALL_TASKS, *tasks], key="lb_task")
    metrics = ctx.q("list_metrics", suite, None if task == ALL_TASKS else task, version)
    if not metrics:
        st.info(f"No metrics recorded for {suite} v{version} yet.")
        return
    metric = cols[3].selectbox("Metric", metrics, key="lb_metric", help="Metrics found in the store")
    cols[4].markdown(f"<br>{'↓ lower' if R.lower_is_better(metric) else '↑ higher'} is better",
                     unsafe_allow_html=True)

    sel_tasks = None if task == ALL_TASKS else [task]
    lb = ctx.q("leaderboard", suite, metric, sel_tasks, version)
    if lb.empty:
        st.info(f"No finished run of {suite} v{version} reports {metric}"
                + ("" if task == ALL_TASKS else f" on {task}") + ".")
        common.show_failed(ctx, suite, version)
        return
    if not (lb.role == "distilled").any():
        others = [v for v in ctx.q("list_suites").query("suite == @suite and n_finished > 0").suite_version
                  if v != version]
        st.info(f"No distilled run of {suite} v{version} has finished yet: only the reference rows are shown."
                + (f" Other versions with results: {', '.join(others)}." if others else ""))
    lb = _sampler_filter(lb)
    table = display_table(lb)
    st.dataframe(_styled(table), hide_index=True, width="stretch", key="lb_table", placeholder="–",
                 column_config={"Setting": st.column_config.TextColumn(pinned=True)})
    rank_by = "the average over tasks" if lb.attrs["rank_by"] == R.AVERAGE else lb.attrs["rank_by"]
    test = (f"the paired bootstrap on the per-sample `{lb.attrs['score']}` scores (same prompts, same sampling "
            "seeds; prompts resampled with their seeds, training seeds too when there are several)"
            if lb.attrs.get("score") else "Welch's t-test on the per-seed values (this metric has no per-sample "
            "scores)")
    st.caption(
        f"{common.metric_help(metric)}. Mean over each training seed's sampling seeds (repeat runs of one seed "
        f"averaged first), then over the setting's training seeds; ± is the 95 % Student-t half-width over all "
        f"per-seed values of the row. Rank by {rank_by} (distilled settings only). ≈ best, Δ vs best (row − best, "
        f"95 % CI) and p: {test}; ≈ best where p ≥ {R.ALPHA}. "
        + ("Band %: share of the teacher − undistilled band recovered, paired. " if "Band %" in table.columns else "")
        + "Seeds: distinct training seeds; Repeats: extra runs of a seed, averaged into it. Shaded rows are "
        "references (teacher, undistilled student). Cost columns: mean over runs.")
    res = None
    if lb.attrs.get("score"):
        res = ctx.q("resolution", suite, version, list(lb.attrs["tasks"]), metric)
        line = resolution_line(res)
        if line:
            st.caption(line)
    _class_notes(lb)

    md = R.to_markdown(lb, include_cost=True, resolution=res)
    fname = f"leaderboard_{suite}_v{version}_{metric}" + ("" if task == ALL_TASKS else "_" + task.replace("/", "-"))
    d1, d2, _ = st.columns([1, 1, 4])
    d1.download_button("Download Markdown", md, file_name=f"{fname}.md", mime="text/markdown", key="lb_md",
                       on_click="ignore")
    d2.download_button("Download CSV", table.to_csv(index=False), file_name=f"{fname}.csv", mime="text/csv",
                       key="lb_csv", on_click="ignore")
    with st.expander("Paper-style table (Markdown)"):
        st.code(md, language=None)

    counts = ctx.q("status_counts", suite, version)
    if counts.get("running"):
        st.caption(f"{counts['running']} run(s) of this suite still running (not counted).")
    common.show_failed(ctx, suite, version)


def sampler_of(setting: str) -> str:
    """The sampler of a leaderboard row: a run with ``--sampler`` other than ``off`` is filed as
    ``<objective setting>+<sampler setting>`` (kdbench/recipe.py ``DistillRun.setting``)."""
    return setting.split("+", 1)[1] if "+" in setting else "off"


def _sampler_filter(lb: pd.DataFrame) -> pd.DataFrame:
    """Where the version holds on-policy runs, a "Sampler" choice: every row, or the distilled rows
    of one sampler (references always shown). Ranks and intervals stay those of the whole table."""
    distilled = lb.role == "distilled"
    samplers = sorted({sampler_of(s) for s in lb.setting[distilled]} - {"off"})
    if not samplers:
        return lb
    pick = st.selectbox("Sampler", ["all", "off", *samplers], key="lb_sampler",
                        help="where the training responses came from (kdbench run --sampler)")
    if pick == "all":
        return lb
    out = lb[~distilled | (lb.setting.map(sampler_of) == pick)]
    out.attrs = lb.attrs
    return out


def _class_notes(lb: pd.DataFrame) -> None:
    """Equivalence classes (parallel gradients, from the suite's analysis run) under the table; without an
    analysis, the known identity CSD(S,S) ∥ rkl (REFERENCE §1) as a note."""
    classes = lb.attrs.get("classes") or []
    for line in class_lines(classes):
        st.caption("Equivalence class " + line)
    if classes:
        return
    settings = set(lb.setting)
    csd_ss = [s for s in settings if re.match(r"^csd\b.*\bw1=S\b.*\bw2=S\b", s)]
    if csd_ss and "rkl" in settings:
        st.caption(f"Note: {', '.join(sorted(csd_ss))} has the same gradient direction as rkl (2τ² × the "
                   "gradient of KL(q_τ‖p_τ)); differences between these rows come from scale (effective learning "
                   "rate) and numerics, not from the direction of the update. `kdbench analyze` measures it.")
