"""Fidelity vs diversity: ROUGE-L against Self-BLEU (or distinct-2, or Self-BLEU across seeds), one point per
setting with 95 % CIs."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from kdbench import results as R
from leaderboard_app import common

DIVERSITY_TITLES = {"self_bleu": "Self-BLEU (lower = more diverse)", "distinct_2": "distinct-2 (higher = more diverse)",
                    "self_bleu_across_seeds": "Self-BLEU across seeds, per prompt (lower = more diverse)"}
DIVERSITY = tuple(DIVERSITY_TITLES)
KIND = {"teacher": "teacher", "student-init": "student-init", "distilled": "distilled setting"}


def chart(df: pd.DataFrame, fidelity: str, diversity: str) -> alt.LayerChart:
    d = pd.DataFrame({
        "label": df.setting, "kind": df.role.map(KIND).fillna(df.role),
        "x": df[diversity], "x_lo": df[R.stat_col(diversity, "ci_lo")], "x_hi": df[R.stat_col(diversity, "ci_hi")],
        "y": df[fidelity], "y_lo": df[R.stat_col(fidelity, "ci_lo")], "y_hi": df[R.stat_col(fidelity, "ci_hi")],
    }).astype({"x": float, "x_lo": float, "x_hi": float, "y": float, "y_lo": float, "y_hi": float})
    # a single-seed row has no CI: draw no bar rather than a NaN one
    for c in ("x_lo", "x_hi"):
        d[c] = d[c].fillna(d.x)
    for c in ("y_lo", "y_hi"):
        d[c] = d[c].fillna(d.y)
    kinds = ["distilled setting", "teacher", "student-init"]
    color = alt.Color("kind:N", title=None, scale=alt.Scale(domain=kinds, range=["#1f77b4", "#d62728", "#7f7f7f"]))
    shape = alt.Shape("kind:N", title=None, scale=alt.Scale(domain=kinds, range=["circle", "diamond", "square"]))
    x_title = DIVERSITY_TITLES.get(diversity, diversity)
    lo, hi = float(d.x_lo.min()), float(d.x_hi.max())
    span = (hi - lo) or abs(hi) or 1.0
    # room on the right for the labels of the rightmost points
    xscale = alt.Scale(zero=False, nice=False, domain=[lo - 0.05 * span, hi + 0.3 * span])
    x = alt.X("x:Q", title=x_title, scale=xscale)
    y = alt.Y("y:Q", title=fidelity, scale=alt.Scale(zero=False))
    base = alt.Chart(d)
    xerr = base.mark_rule(strokeWidth=1.5).encode(x=alt.X("x_lo:Q", title=x_title, scale=xscale),
                                                   x2="x_hi:Q", y=y, color=color)
    yerr = base.mark_rule(strokeWidth=1.5).encode(x=x, y=alt.Y("y_lo:Q", title=fidelity, scale=alt.Scale(zero=False)),
                                                   y2="y_hi:Q", color=color)
    pts = base.mark_point(filled=True, size=110, opacity=1).encode(
        x=x, y=y, color=color, shape=shape,
        tooltip=[alt.Tooltip("label:N", title="setting"), "kind:N", alt.Tooltip("x:Q", format=".3f", title=diversity),
                 alt.Tooltip("y:Q", format=".2f", title=fidelity)])
    # labels of distilled settings above-right of their point, of the references below-right, so a
    # distilled point near the teacher or the undistilled student keeps a readable label
    is_ref = "datum.kind !== 'distilled setting'"
    text = alt.layer(
        base.transform_filter(f"!({is_ref})").mark_text(align="left", dx=8, dy=-8, fontSize=12)
        .encode(x=x, y=y, text="label:N", color=color),
        base.transform_filter(is_ref).mark_text(align="left", dx=8, dy=12, fontSize=12, fontStyle="italic")
        .encode(x=x, y=y, text="label:N", color=color))
    return alt.layer(xerr, yerr, pts, text).properties(height=480).interactive()


def render(ctx: common.Ctx) -> None:
    st.title("Fidelity vs diversity")
    cols = st.columns([1.5, 3, 2, 2, 3])
    picked = common.suite_picker(ctx, "fd", cols[0], cols[1])
    if picked is None:
        return
    suite, version = picked
    tasks = ctx.q("list_tasks", suite, version)
    task = cols[2].selectbox("Task", tasks, key="fd_task")
    metrics = ctx.q("list_metrics", suite, task, version)
    fid_opts = metrics if metrics else ["rougeL"]
    fidelity = cols[3].selectbox("Fidelity (y)", fid_opts, key="fd_fidelity",
                                 index=fid_opts.index("rougeL") if "rougeL" in fid_opts else 0)
    div_opts = [m for m in DIVERSITY if m in metrics]
    if not div_opts:
        st.info(f"{task} has no diversity metric ({', '.join(DIVERSITY)}) in the store.")
        return
    diversity = cols[4].radio("Diversity (x)", div_opts, key="fd_diversity", horizontal=True)
    df = ctx.q("fidelity_diversity", suite, task, fidelity, div_opts, version)
    if df.empty or fidelity not in df.columns:
        st.info(f"No finished run of {suite} v{version} reports {fidelity} on {task}.")
        return
    plotted = df.dropna(subset=[fidelity, diversity])
    if plotted.empty:
        st.info(f"No row of {suite} v{version} has both {fidelity} and {diversity} on {task}.")
    else:
        st.altair_chart(chart(plotted, fidelity, diversity), width="stretch")
    st.caption(f"One point per setting (mean over runs and sampling seeds); bars: 95 % CI (none where there is a "
               f"single value, e.g. one run of a seed-free metric such as self_bleu_across_seeds). "
               f"{common.metric_help(fidelity)}; {common.metric_help(diversity)}. Teacher and undistilled "
               "student are the red diamond and grey square.")
    shown = pd.DataFrame({"Setting": df.setting, "Role": df.role.map(common.ROLE_LABEL).fillna(df.role)})
    for m in (fidelity, *div_opts):
        shown[m] = df[m].astype(float)
        shown[f"{m} ±"] = df[R.stat_col(m, "ci95")].astype(float)
    st.dataframe(shown, hide_index=True, width="stretch", placeholder="–", key="fd_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in shown.columns[2:]})
