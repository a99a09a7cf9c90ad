"""Paper-style Markdown tables of the leaderboard (and of any DataFrame)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kdbench.results.stats import ALPHA, AVERAGE, stat_col
from kdbench.store import ROLE_DISTILLED


def _fmt(v: Any, decimals: int) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):.{decimals}f}"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(df: pd.DataFrame, decimals: int = 2, include_cost: bool = False) -> str:
    """A paper-style Markdown table of :func:`leaderboard`'s output: one column per task (and Avg.)
    with ``mean ± CI half-width``; the best distilled value of each column in bold; reference rows
    in italics; a ``≈`` after rows whose ranking score is not distinguishable from the best.

    Other DataFrames are rendered cell by cell (floats to ``decimals``)."""
    attrs = df.attrs or {}
    if "tasks" not in attrs:
        return _plain_markdown(df, decimals)
    tasks = list(attrs["tasks"])
    keys = tasks + ([AVERAGE] if len(tasks) > 1 else [])
    lower = bool(attrs.get("lower_is_better"))
    header = ["Setting"] + [("Avg." if k == AVERAGE else k) for k in keys] + ["Rank"]
    if include_cost:
        header += ["Wall time (s)", "Train tok/s", "Peak mem (MB)"]
    best: dict[str, float] = {}
    dist = df[df.role == ROLE_DISTILLED] if not df.empty else df
    for k in keys:
        col = pd.to_numeric(dist[stat_col(k)], errors="coerce").dropna() if not dist.empty else pd.Series(dtype=float)
        if not col.empty:
            best[k] = col.min() if lower else col.max()
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [" ---: "] * (len(header) - 1)) + "|"]
    for _, r in df.iterrows():
        ref = r["role"] != ROLE_DISTILLED
        name = _md_escape(str(r["setting"]))
        name = f"*{name}*" if ref else name
        if not ref and bool(r.get("tied_with_best")) and not pd.isna(r.get("rank")) and int(r["rank"]) != 1:
            name += " ≈"
        cells = [name]
        for k in keys:
            m, h = r[stat_col(k)], r[stat_col(k, "ci95")]
            cell = _fmt(m, decimals) + ("" if pd.isna(h) else f" ± {_fmt(h, decimals)}")
            if not ref and k in best and not pd.isna(m) and round(float(m), decimals) == round(best[k], decimals):
                cell = f"**{cell}**"
            cells.append(cell)
        cells.append("" if pd.isna(r["rank"]) else str(int(r["rank"])))
        if include_cost:
            cells += [_fmt(r.get("wall_time_s"), 1), _fmt(r.get("train_tokens_per_s"), 0),
                      _fmt(r.get("peak_memory_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    arrow = "lower is better" if lower else "higher is better"
    caption = (f"{attrs.get('metric')} ({arrow}) on suite {attrs.get('suite')} v{attrs.get('suite_version')}: "
               f"mean over sampling seeds, then over training seeds; ± is the 95% Student-t half-width over all "
               f"per-seed values; bold: best; ≈: not distinguishable from the best (Welch t-test, p ≥ {ALPHA}).")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _plain_markdown(df: pd.DataFrame, decimals: int) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_escape(c) for c in cols) + " |", "|" + "|".join([" --- "] * len(cols)) + "|"]
    for row in df.itertuples(index=False):
        cells = [_fmt(v, decimals) if isinstance(v, float) else ("" if v is None or v is pd.NA else _md_escape(str(v)))
                 for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
