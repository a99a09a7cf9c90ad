"""Objectives: the registry's catalogue, and the gradient-similarity matrix of an analysis run."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from kdbench import results as R
from leaderboard_app import common


@st.cache_data(show_spinner="Loading the objective registry…")
def catalogue() -> tuple[list[dict], str | None]:
    """Plain-data copy of ``kdbench.registry.list_objectives()``; (entries, error message or None)."""
    try:
        # lazy: imports torch and every objective module; the catalogue formats as `kdbench list` does
        from kdbench import catalogue as C
        from kdbench.registry import list_objectives
        specs = list_objectives()
    except Exception as exc:  # registry missing or broken: the rest of the app still works
        return [], f"{type(exc).__name__}: {exc}"
    out = []
    for s in specs:
        params = [{"name": p.name, "type": str(p.type), "default": C._fmt_value(p.default),
                   "allowed": ", ".join(map(str, p.choices)) if p.choices else (p.range_text() or "any"),
                   "doc": p.doc} for p in s.params]
        out.append({"name": s.name, "parameters": C.format_params(s), "behaviour": s.behaviour,
                    "aliases": alias_text(s, C._fmt_value), "paper": C.short_paper(s.paper), "summary": s.summary,
                    "full_paper": s.paper, "formula": s.formula, "params": params})
    return out, None


def alias_text(spec, fmt_value=str) -> str:
    """``csd_ts = csd(w1=T,w2=S), ...``: each alias with the parameters it fixes, as ``kdbench list`` and
    docs/objectives.md write them (``fmt_value``: kdbench.catalogue's value formatting)."""
    return ", ".join(f"{alias} = {spec.name}({','.join(f'{k}={fmt_value(v)}' for k, v in sorted(fixed.items()))})"
                     for alias, fixed in spec.aliases.items())


OVERVIEW = ("name", "behaviour", "parameters", "summary", "aliases", "paper")


def render(ctx: common.Ctx | None) -> None:
    st.title("Objectives")
    entries, error = catalogue()
    if error:
        st.info(f"The objective catalogue is unavailable ({error}).")
    elif not entries:
        st.info("The objective registry lists no objectives.")
    else:
        overview = pd.DataFrame([{k: e[k] for k in OVERVIEW} for e in entries])
        st.dataframe(overview, hide_index=True, width="stretch", height="content", placeholder="–", key="obj_table",
                     column_config={"name": st.column_config.TextColumn(pinned=True),
                                    "parameters": st.column_config.TextColumn("parameters (defaults)", width="medium"),
                                    "aliases": st.column_config.TextColumn(width="medium"),
                                    "paper": st.column_config.TextColumn(width="medium"),
                                    "summary": st.column_config.TextColumn(width="large")})
        st.caption("Use a name or an alias with `kdbench run --objective NAME`, parameters with `--param key=value`.")
        for e in entries:
            with st.expander(f"{e['name']} — {e['summary'] or e['behaviour']}"):
                st.markdown(f"**Behaviour:** {e['behaviour'] or '–'}  \n**Paper:** {e['full_paper'] or '–'}"
                            + (f"  \n**Aliases:** {e['aliases']}" if e["aliases"] else ""))
                if e["formula"]:
                    st.code(e["formula"], language=None)
                if e["params"]:
                    st.dataframe(pd.DataFrame(e["params"]), hide_index=True, width="stretch", placeholder="–")
    st.subheader("Gradient similarity")
    if ctx is None:
        return
    data = ctx.q("grad_similarity")
    if data is None:
        st.info("No gradient-similarity analysis in the store yet (`kdbench analyze` records one).")
        return
    _heatmap(data)


def _heatmap(data: dict) -> None:
    long = R.grad_similarity_long(data)
    has_ratio = long.norm_ratio.notna().any()
    which = st.radio("Matrix", ["cosine", "norm_ratio"] if has_ratio else ["cosine"], key="obj_matrix",
                     horizontal=True)
    names = list(data["names"])
    if which == "cosine":
        scale = alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True)
        title = "cosine of the gradients (w.r.t. student logits)"
    else:
        scale = alt.Scale(scheme="viridis", type="log")
        title = "gradient norm ratio (row / column)"
    base = alt.Chart(long.dropna(subset=[which])).encode(
        x=alt.X("col:N", sort=names, title=None, axis=alt.Axis(labelAngle=-30, labelLimit=240)),
        y=alt.Y("row:N", sort=names, title=None, axis=alt.Axis(labelLimit=240)))
    rect = base.mark_rect().encode(color=alt.Color(f"{which}:Q", scale=scale, title=which),
                                   tooltip=["row", "col", alt.Tooltip(f"{which}:Q", format=".3f")])
    # light text on the dark cells: strong |cosine|, or the low (dark purple) end of viridis
    dark = (f"abs(datum.{which}) > 0.6" if which == "cosine"
            else f"datum.{which} < {float(long[which].dropna().median())!r}")
    text = base.mark_text(fontSize=12).encode(text=alt.Text(f"{which}:Q", format=".2f"),
                                              color=alt.condition(dark, alt.value("white"), alt.value("black")))
    st.altair_chart((rect + text).properties(height=max(300, 60 * len(names) + 60), title=title), width="stretch")
    st.caption(f"From analysis run #{data['run_id']} (suite {data['suite']}).")
    classes = R.equivalence_classes(data)
    for c in classes:
        st.caption(f"Equivalence class {c['label']}: {c['reason']}. The leaderboard ranks its members together "
                   "unless the paired test separates them.")
    in_class = {frozenset(p[:2]) for c in classes for p in c["pairs"]}
    near = [(r.row, r.col, r.cosine) for r in long.itertuples()
            if r.row < r.col and r.cosine is not None and r.cosine == r.cosine and 0.99 <= r.cosine
            and frozenset((r.row, r.col)) not in in_class]
    for a, b, cos in near:
        st.caption(f"{a} and {b} are nearly parallel (cosine {cos:.4f} < {R.PARALLEL_COSINE}): not an equivalence "
                   "class, but their updates point almost the same way.")
