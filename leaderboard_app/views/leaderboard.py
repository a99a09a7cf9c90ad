"""Leaderboard page: one row per setting, mean ± 95 % CI per task and on average, rank, ≈ best, cost."""

from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from kdbench import results as R
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
        ("★ best" if int(r.rank) == 1 else ("≈ best" if r.tied_with_best else ""))
        for r in lb.itertuples()
    ]
    out["Runs"] = lb.n_runs.astype("int64")
    out["Wall time (s)"] = lb.wall_time_s.astype("float64")
    out["Train tok/s"] = lb.train_tokens_per_s.astype("float64")
    out["Peak mem (MB)"] = lb.peak_memory_mb.astype("float64")
    return out


def _styled(table: pd.DataFrame):
    numeric = [c for c in table.columns if c not in ("Setting", "Role", "Rank", "vs best", "Runs")]
    refs = table.Role != "distilled"
    sty = table.style.format("{:.2f}", subset=[c for c in numeric if c not in
                                                 ("Wall time (s)", "Train tok/s", "Peak mem (MB)")], na_rep="–")
    sty = sty.format("{:,.0f}", subset=["Wall time (s)", "Train tok/s", "Peak mem (MB)"], na_rep="–")
    sty = sty.format("{:.0f}", subset=["Rank"], na_rep="–")
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
    table = display_table(lb)
    st.dataframe(_styled(table), hide_index=True, width="stretch", key="lb_table", placeholder="–",
                 column_config={"Setting": st.column_config.TextColumn(pinned=True)})
    rank_by = "the average over tasks" if lb.attrs["rank_by"] == R.AVERAGE else lb.attrs["rank_by"]
    st.caption(
        f"{common.metric_help(metric)}. Mean over each run's sampling seeds, then over the setting's "
        f"training-seed runs; ± is the 95 % Student-t half-width over all per-seed values. Rank by {rank_by} "
        f"(distilled settings only); ≈ best: a Welch t-test against the best cannot reject equality at the "
        f"{R.ALPHA} level. Shaded rows are references (teacher, undistilled student). Cost columns: mean over runs.")
    _identity_note(lb)

    md = R.to_markdown(lb, include_cost=True)
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


def _identity_note(lb: pd.DataFrame) -> None:
    """CSD with w1 = w2 = S has reverse KL's gradient direction (REFERENCE §1): say so next to both rows."""
    settings = set(lb.setting)
    csd_ss = [s for s in settings if re.match(r"^csd\b.*\bw1=S\b.*\bw2=S\b", s)]
    if csd_ss and "rkl" in settings:
        st.caption(f"Note: {', '.join(sorted(csd_ss))} has the same gradient direction as rkl (2τ² × the "
                   "gradient of KL(q_τ‖p_τ)); differences between these rows come from scale (effective learning "
                   "rate) and numerics, not from the direction of the update.")
