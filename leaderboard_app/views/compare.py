"""Compare two settings (or two runs): per-task paired differences with their CIs and the suite's smallest
resolvable difference, and the prompts that differ most."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from kdbench import results as R
from leaderboard_app import common


def _options(ctx: common.Ctx, suite: str, version: str, by_run: bool) -> dict[str, str]:
    if by_run:
        runs = ctx.q("list_runs", suite, "finished")
        runs = runs[(runs.suite_version == version) & (runs.role != "analysis")]
        return {f"run:{r.run_id}": f"#{r.run_id} · {r.setting if isinstance(r.setting, str) else r.role} · "
                f"seed {r.seed}" + (f" · ×{r.repeats}" if r.repeats > 1 else "") for r in runs.itertuples()}
    settings = ctx.q("list_settings", suite, version)
    return {s: common.setting_label(s) for s in settings.setting}


def tasks_of(cmp: pd.DataFrame) -> list[str]:
    return [t for t in cmp.task if t != R.AVERAGE]


def render(ctx: common.Ctx) -> None:
    st.title("Compare")
    top = st.columns([1.5, 3, 2, 2])
    picked = common.suite_picker(ctx, "cmp", top[0], top[1])
    if picked is None:
        return
    suite, version = picked
    metrics = ctx.q("list_metrics", suite, None, version)
    if not metrics:
        st.info(f"No metrics recorded for {suite} v{version}.")
        return
    metric = top[2].selectbox("Metric", metrics, key="cmp_metric")
    by_run = top[3].radio("Compare", ["settings", "runs"], key="cmp_by", horizontal=True) == "runs"
    opts = _options(ctx, suite, version, by_run)
    keys = list(opts)
    if len(keys) < 2:
        st.info("Need at least two finished settings (or runs) to compare.")
        return
    # default: the two best-ranked distilled settings
    lb = ctx.q("leaderboard", suite, metric, None, version)
    ranked = [s for s in lb.sort_values("rank").setting if s in opts and not by_run] if not lb.empty else []
    da, db = (ranked + [k for k in keys if k not in ranked])[:2]
    c = st.columns(2)
    a = c[0].selectbox("A", keys, index=keys.index(da), format_func=opts.get, key="cmp_a")
    b = c[1].selectbox("B", keys, index=keys.index(db), format_func=opts.get, key="cmp_b")
    if a == b:
        st.info("Pick two different rows.")
        return
    cmp = ctx.q("compare", suite, a, b, metric, None, version)
    if cmp.empty:
        st.info(f"{opts[a]} and {opts[b]} share no task with {metric}.")
        return
    verdict = {"a": f"A ({opts[a]})", "b": f"B ({opts[b]})", "≈": "≈ (not separated)"}
    res = {k: (ctx.q("resolution", suite, version, list(tasks_of(cmp)) if k == R.AVERAGE else k, metric)
               if cmp.attrs.get("score") else None) for k in cmp.task}
    shown = pd.DataFrame({
        "Task": cmp.task.replace({R.AVERAGE: "Average"}),
        "A": cmp.mean_a, "A ±": cmp.ci95_a, "B": cmp.mean_b, "B ±": cmp.ci95_b,
        "Δ (A − B)": cmp.delta, "Δ CI low": cmp.delta_lo, "Δ CI high": cmp.delta_hi,
        "p": cmp.p_value, "Test": cmp.test, "Prompts": cmp.n_prompts, "Training seeds": cmp.n_train_seeds,
        "Resolvable Δ": [res[k]["value"] if res[k] else float("nan") for k in cmp.task],
        "Better": cmp.better.map(verdict),
    })
    st.dataframe(shown, hide_index=True, width="stretch", placeholder="–", key="cmp_table",
                 column_config={k: st.column_config.NumberColumn(format="%.3f")
                                for k in ("A", "A ±", "B", "B ±", "Δ (A − B)", "Δ CI low", "Δ CI high",
                                          "Resolvable Δ")}
                 | {"p": st.column_config.NumberColumn(format="%.4f")})
    st.caption(f"{common.metric_help(metric)}. Δ, its 95 % CI and p: the paired bootstrap on the per-sample scores "
               "(both rows answer the same prompts with the same sampling seeds: differences aligned per training "
               "seed, prompt and sampling seed; prompts resampled with their seeds, training seeds too when there "
               "are several; 2000 replicates) — Welch's t-test on the per-seed values where the metric has no "
               "per-sample scores. Better: the side that wins where p < 0.05. A ±, B ±: each row's own 95 % "
               "Student-t half-width.")
    first = next((r for r in res.values() if r), None)
    if first is not None:
        st.caption("Resolvable Δ: the smallest difference this suite version resolves on that task — 1.96 × the "
                   f"pooled standard error of a paired difference over the {first['basis']} "
                   f"({first['n_pairs']} pairs). Smaller differences are not separated.")
    single = [k for k in cmp.task if cmp.set_index("task").loc[k, "test"] == "paired bootstrap"
              and cmp.set_index("task").loc[k, "n_train_seeds"] == 1]
    if single:
        st.caption("One training seed: the paired test compares these trained models on this suite's prompts; it "
                   "does not cover training-seed noise (run more seeds for claims about the objectives).")

    st.subheader("Prompts where they differ most")
    tasks = ctx.q("list_tasks", suite, version)
    pc = st.columns([2, 2, 1])
    task = pc[0].selectbox("Task", tasks, key="cmp_task")
    scores = ctx.q("score_names", suite, task, version)
    if not scores:
        st.info(f"No per-sample scores recorded for {task}.")
        return
    score = pc[1].selectbox("Per-sample score", scores, key="cmp_score",
                            index=scores.index(metric) if metric in scores else 0)
    limit = pc[2].number_input("Show", min_value=1, max_value=50, value=5, key="cmp_limit")
    diff = ctx.q("prompts_differing_most", suite, a, b, task, score, int(limit), version)
    if diff.empty:
        st.info("No prompt has scores on both sides.")
        return
    st.caption(f"Per-prompt {score} averaged over every sampling seed and run of each side; outputs shown: "
               "each side's first sample (lowest run id and seed).")
    for r in diff.itertuples():
        with st.container(border=True):
            st.markdown(f"**{r.prompt_id}** · A {common.fmt(r.score_a)} · B {common.fmt(r.score_b)} · "
                        f"Δ {common.fmt(r.diff)}")
            st.text(r.prompt)
            cols = st.columns(3)
            cols[0].caption(f"A: {opts[a]} (seed {r.seed_a})")
            cols[0].text(common.text_block(r.output_a))
            cols[1].caption(f"B: {opts[b]} (seed {r.seed_b})")
            cols[1].text(common.text_block(r.output_b))
            cols[2].caption("Reference")
            cols[2].text("\n".join(r.references) if r.references else "–")
