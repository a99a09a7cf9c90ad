"""Run detail: config and provenance, training curves, per-seed metrics, samples beside reference and teacher."""

from __future__ import annotations

import math

import altair as alt
import streamlit as st

from kdbench import results as R
from leaderboard_app import common

PAGE_SIZE = 10
STEP = alt.X("step:Q", title="step", axis=alt.Axis(format="d", tickMinStep=1))


def _run_label(r) -> str:
    name = r.setting if isinstance(r.setting, str) else r.role
    reps = f" · ×{r.repeats} (repeats)" if r.repeats > 1 else ""
    return f"#{r.run_id} · {name} · seed {r.seed} · {r.status} · {r.suite} v{r.suite_version}{reps}"


def render(ctx: common.Ctx) -> None:
    st.title("Run detail")
    runs = ctx.q("list_runs")
    if runs.empty:
        st.info("No runs in the store.")
        return
    labels = {int(r.run_id): _run_label(r) for r in runs.itertuples()}
    ids = list(labels)
    # default: the newest finished distilled run of a suite's default (standard) version, else the newest run
    fin = runs[(runs.status == "finished") & (runs.role == "distilled")]
    fin = fin[[v == ctx.q("default_version", s) for s, v in zip(fin.suite, fin.suite_version)]]
    default = ids.index(int(fin.run_id.iloc[0])) if not fin.empty else 0
    run_id = st.selectbox("Run", ids, index=default, format_func=labels.get, key="rd_run")
    d = ctx.q("run_detail", run_id)
    if d is None:
        st.info(f"Run #{run_id} is not in the store.")
        return
    name = d["setting"] or d["role"]
    st.subheader(f"Run #{run_id}: {name}")
    st.caption(f"role {d['role']} · suite {d['suite']} v{d['suite_version']} · training seed {d['seed']} · "
               f"status {d['status']} · created {common.when(d['created_at'])} · "
               f"finished {common.when(d['finished_at'])}")
    reps = ctx.q("repeats_of", run_id)
    if len(reps) > 1:
        st.caption(f"Repeats: runs {', '.join(f'#{i}' for i in reps)} are one experiment (same "
                   + ("config_hash" if d.get("config_hash") else "setting, suite version and training seed")
                   + "): the leaderboard averages them into one observation for this training seed.")
    if d["role"] == "distilled" and d["setting"]:
        c = R.class_of(ctx.q("gradient_classes", d["suite"]), d["setting"])
        if c is not None:
            st.caption(f"Gradient class {c['label']}: {c['reason']} (analysis run #{c['run_id']}).")
    if d["status"] == "failed":
        st.error(f"This run failed: {d['error']}")
    elif d["status"] == "running":
        st.info("This run is still running: metrics and samples appear when it finishes.")

    m = st.columns(4)
    m[0].metric("Wall time (s)", common.fmt(d["wall_time_s"], 1))
    m[1].metric("Train tokens/s", common.fmt(d["train_tokens_per_s"], 0))
    m[2].metric("Peak memory (MB)", common.fmt(d["peak_memory_mb"], 0))
    m[3].metric("Selected step", "–" if d["selected_step"] is None else str(d["selected_step"]),
                help=f"Checkpoint selection: {d['selection_rule'] or 'not recorded'}")

    t_metrics, t_curves, t_samples, t_config = st.tabs(["Metrics", "Training curves", "Samples",
                                                        "Config & provenance"])
    with t_metrics:
        _metrics(ctx, run_id)
    with t_curves:
        _curves(ctx, run_id)
    with t_samples:
        _samples(ctx, run_id, d)
    with t_config:
        c1, c2 = st.columns(2)
        c1.markdown("**Resolved config**")
        c1.json(d["config"], expanded=True)
        c2.markdown("**Provenance**")
        c2.json(d["provenance"], expanded=True)
        st.markdown(f"**Objective** `{d['objective'] or '–'}` · **params** `{d['params']}` · "
                    f"**checkpoint** `{d['checkpoint_path'] or '–'}` · **selection** {d['selection_rule'] or '–'}")


def _metrics(ctx: common.Ctx, run_id: int) -> None:
    summary = ctx.q("run_summary", run_id)
    if summary.empty:
        st.info("No metrics recorded for this run.")
        return
    st.markdown("**Mean over sampling seeds** (95 % Student-t CI)")
    single = sorted(set(summary.metric[summary.n_seeds < 2]))
    if single:
        st.caption(f"{', '.join(single)}: one value per run (computed across seeds or without sampling), "
                   "so no std or CI.")
    st.dataframe(summary, hide_index=True, width="stretch", placeholder="–", key="rd_summary",
                 column_config={c: st.column_config.NumberColumn(format="%.4g")
                                for c in ("mean", "std", "ci_lo", "ci_hi")})
    st.markdown("**Per sampling seed**")
    st.dataframe(ctx.q("run_metrics", run_id), hide_index=True, width="stretch", placeholder="–", key="rd_per_seed")


def _curves(ctx: common.Ctx, run_id: int) -> None:
    cv = ctx.q("curves", run_id)
    if cv.empty:
        st.info("No training curve recorded for this run.")
        return
    loss = cv.dropna(subset=["loss"])
    if not loss.empty:
        st.altair_chart(alt.Chart(loss).mark_line(point=True).encode(
            x=STEP, y=alt.Y("loss:Q"), color=alt.Color("split:N"),
            tooltip=["step", "split", alt.Tooltip("loss:Q", format=".4f")]).properties(height=280, title="Loss"),
            width="stretch")
    terms = cv.attrs.get("terms", [])
    if terms:
        long = cv.melt(id_vars=["step", "split"], value_vars=terms, var_name="term", value_name="value").dropna()
        st.altair_chart(alt.Chart(long).mark_line(point=True).encode(
            x=STEP, y=alt.Y("value:Q"), color="term:N", strokeDash="split:N",
            tooltip=["step", "split", "term", alt.Tooltip("value:Q", format=".4f")]).properties(
            height=280, title="Objective terms (and validation metrics)"), width="stretch")
    with st.expander("Curve data"):
        st.dataframe(cv, hide_index=True, width="stretch", placeholder="–")


def _samples(ctx: common.Ctx, run_id: int, d: dict) -> None:
    tasks = ctx.q("sample_tasks", run_id)
    if not tasks:
        st.info("No samples recorded for this run.")
        return
    c = st.columns([2, 1, 1])
    task = c[0].selectbox("Task", tasks, key="rd_task")
    seeds = ctx.q("sample_seeds", run_id, task)
    seed = c[1].selectbox("Sampling seed", seeds, key="rd_seed")
    total = ctx.q("count_samples", run_id, task, seed)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = c[2].number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1, key="rd_page")
    teacher = d["role"] != "teacher"
    df = ctx.q("samples", run_id, task, seed, PAGE_SIZE, (int(page) - 1) * PAGE_SIZE, teacher)
    tid = df.attrs.get("teacher_run_id")
    st.caption(f"{total} samples; teacher responses from run #{tid}." if tid and teacher else
               f"{total} samples." + (" No teacher reference run in this suite version." if teacher else ""))
    for r in df.itertuples():
        scores = " · ".join(common.fmt_score(k, v) for k, v in r.scores.items())
        with st.container(border=True):
            st.markdown(f"**{r.prompt_id}** · seed {r.seed} · {scores}")
            st.text(r.prompt)
            cols = st.columns(3 if teacher else 2)
            cols[0].caption("This run")
            cols[0].text(common.text_block(r.output))
            cols[1].caption("Reference" + ("s" if len(r.references) > 1 else ""))
            cols[1].text("\n".join(f"• {x}" for x in r.references) if len(r.references) > 1 else
                         (r.references[0] if r.references else "–"))
            if teacher:
                cols[2].caption("Teacher (same prompt and seed)")
                cols[2].text(common.text_block(r.teacher_output))
