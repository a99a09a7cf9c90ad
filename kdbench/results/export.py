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


def _signed(v: Any, decimals: int) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):+.{decimals}f}"


def _interval(m: Any, lo: Any, hi: Any, decimals: int, signed: bool = True) -> str:
    f = _signed if signed else _fmt
    if pd.isna(m):
        return "–"
    return f(m, decimals) + ("" if pd.isna(lo) or pd.isna(hi) else f" [{f(lo, decimals)}, {f(hi, decimals)}]")


def class_lines(classes: list[dict], decimals: int = 2) -> list[str]:
    """One line per equivalence class of :func:`leaderboard`'s ``attrs["classes"]``: its reason and the
    paired verdict between its members."""
    out = []
    for c in classes:
        verdicts = []
        for t in c.get("tests", []):
            d = _interval(t.get("mean"), t.get("lo"), t.get("hi"), decimals)
            how = "paired" if t.get("test") == "paired bootstrap" else "Welch"
            verdicts.append(f"{t['setting']} − {t['vs']} = {d} ({how}, "
                            + ("separated)" if t.get("separated") else "not separated)"))
        tail = (" Not separated by the paired test: one shared rank." if c.get("shared_rank")
                else " The paired test separates them, so they are ranked apart.") if c.get("tests") else ""
        out.append(f"{c['label']}: {c['reason']}." + (f" {'; '.join(verdicts)}." if verdicts else "") + tail)
    return out


def resolution_line(res: dict | None, decimals: int = 2) -> str:
    """``Smallest resolvable difference …`` of a :func:`kdbench.results.resolution` result ('' without one)."""
    if not res or pd.isna(res.get("value")):
        return ""
    tasks = res.get("tasks") or []
    where = tasks[0] if len(tasks) == 1 else f"the mean over {len(tasks)} tasks"
    return (f"Smallest resolvable difference in {res.get('metric')} on {where}: {_fmt(res['value'], decimals)} "
            f"(1.96 × the pooled standard error of a paired difference, over {res['n_pairs']} "
            f"{res['basis']}; {res['n_prompts']} prompts × {res['n_train_seeds']} training seed(s)).")


def to_markdown(df: pd.DataFrame, decimals: int = 2, include_cost: bool = False,
                resolution: dict | None = None) -> str:
    """A paper-style Markdown table of :func:`leaderboard`'s output: one column per task (and Avg.) with
    ``mean ± CI half-width``; the best distilled value of each column in bold; reference rows in italics;
    a ``≈`` after rows the paired test cannot separate from the best; then Rank, ``Δ vs best`` (paired
    difference to the best row with its 95 % CI), ``vs ce`` (where a ``ce`` row exists: better / worse / ≈
    and the paired difference), ``Band %`` (share of the teacher − undistilled band recovered, paired CI;
    where both reference rows exist), ``Class`` (gradient equivalence class, where any), ``Seeds``
    (training seeds, and repeat runs averaged into them), optionally the cost columns. The caption
    states the statistics, the suite's smallest resolvable difference (``resolution``: a
    :func:`kdbench.results.resolution` result) and one line per equivalence class.

    Other DataFrames are rendered cell by cell (floats to ``decimals``)."""
    attrs = df.attrs or {}
    if "tasks" not in attrs:
        return _plain_markdown(df, decimals)
    tasks = list(attrs["tasks"])
    keys = tasks + ([AVERAGE] if len(tasks) > 1 else [])
    lower = bool(attrs.get("lower_is_better"))
    has = lambda c: c in df.columns and not df.empty  # noqa: E731
    show_ce = bool(attrs.get("ce")) and has("vs_ce")
    show_band = has("band_recovered") and pd.to_numeric(df["band_recovered"], errors="coerce").notna().any()
    show_class = has("equiv_class") and (df["equiv_class"].fillna("") != "").any()
    show_delta = has("delta_vs_best")
    header = ["Setting"] + [("Avg." if k == AVERAGE else k) for k in keys] + ["Rank"]
    header += ["Δ vs best [95% CI]"] if show_delta else []
    header += [f"vs {attrs['ce']} [95% CI]"] if show_ce else []
    header += ["Band % [95% CI]"] if show_band else []
    header += ["Class"] if show_class else []
    header += ["Seeds"] if has("n_runs") else []
    if include_cost:
        header += ["Wall time (s)", "Train tok/s", "Peak mem (MB)"]
    best: dict[str, float] = {}
    dist = df[df.role == ROLE_DISTILLED] if not df.empty else df
    for k in keys:
        col = pd.to_numeric(dist[stat_col(k)], errors="coerce").dropna() if not dist.empty else pd.Series(dtype=float)
        if not col.empty:
            best[k] = col.min() if lower else col.max()
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [" ---: "] * (len(header) - 1)) + "|"]
    welch_rows = False
    for _, r in df.iterrows():
        ref = r["role"] != ROLE_DISTILLED
        name = _md_escape(str(r["setting"]))
        name = f"*{name}*" if ref else name
        if not ref and bool(r.get("tied_with_best")) and not pd.isna(r.get("rank")) and r.get("test_vs_best") != "best":
            name += " ≈"
        cells = [name]
        for k in keys:
            m, h = r[stat_col(k)], r[stat_col(k, "ci95")]
            cell = _fmt(m, decimals) + ("" if pd.isna(h) else f" ± {_fmt(h, decimals)}")
            if not ref and k in best and not pd.isna(m) and round(float(m), decimals) == round(best[k], decimals):
                cell = f"**{cell}**"
            cells.append(cell)
        cells.append("" if pd.isna(r["rank"]) else str(int(r["rank"])))
        if show_delta:
            if ref or pd.isna(r.get("rank")):
                cells.append("")
            elif r.get("test_vs_best") == "best":
                cells.append("best")
            else:
                mark = " (W)" if r.get("test_vs_best") == "welch" else ""
                welch_rows |= bool(mark)
                cells.append(_interval(r["delta_vs_best"], r["delta_vs_best_lo"], r["delta_vs_best_hi"], decimals) + mark)
        if show_ce:
            v = r.get("vs_ce") or ""
            if ref or not v:
                cells.append("")
            elif v == "ce":
                cells.append("(fine-tuning baseline)")
            else:
                cells.append(f"{v} " + _interval(r["delta_vs_ce"], r["delta_vs_ce_lo"], r["delta_vs_ce_hi"], decimals))
        if show_band:
            cells.append("" if ref else _interval(r["band_recovered"], r["band_lo"], r["band_hi"], 1, signed=False))
        if show_class:
            cells.append(str(r.get("equiv_class") or ""))
        if has("n_runs"):
            reps = int(r["repeats"]) if "repeats" in r and not pd.isna(r["repeats"]) else 0
            cells.append(("" if pd.isna(r["n_runs"]) else str(int(r["n_runs"])))
                         + (f" (+{reps} repeat{'s' if reps != 1 else ''})" if reps else ""))
        if include_cost:
            cells += [_fmt(r.get("wall_time_s"), 1), _fmt(r.get("train_tokens_per_s"), 0),
                      _fmt(r.get("peak_memory_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    arrow = "lower is better" if lower else "higher is better"
    test = (f"a paired bootstrap over prompts (each prompt's sampling seeds together) and training seeds on the "
            f"per-sample `{attrs['score']}` scores" if attrs.get("score") else "Welch's t-test on the per-seed values")
    caption = (f"{attrs.get('metric')} ({arrow}) on suite {attrs.get('suite')} v{attrs.get('suite_version')}: "
               f"mean over sampling seeds, then over training seeds (repeat runs of one seed averaged first); ± is "
               f"the 95% Student-t half-width over all per-seed values; bold: best; ≈: not separated from the best "
               f"(p ≥ {ALPHA}). Δ vs best" + (f", vs {attrs['ce']}" if show_ce else "") + f": {test}, 95% "
               "percentile interval" + ("; (W): Welch, no aligned per-sample scores" if welch_rows else "") + ".")
    if show_band:
        caption += " Band %: 100 · (row − student-init) / (teacher − student-init), paired on the same prompts."
    extra = [line for line in [resolution_line(resolution, decimals), *class_lines(attrs.get("classes") or [],
                                                                                 decimals)] if line]
    return "\n".join(lines) + "\n\n" + caption + "\n" + "".join(f"\n{line}\n" for line in extra)


def leaderboard_markdown(engine, suite: str, metric: str, tasks=None, suite_version: str | None = None,
                         decimals: int = 2, include_cost: bool = False) -> str:
    """The README table after a sweep: :func:`to_markdown` of :func:`kdbench.results.leaderboard` with the
    suite's smallest resolvable difference on the ranking key (the single task, or the mean over tasks)."""
    from kdbench.results.leaderboard import leaderboard
    from kdbench.results.paired import resolution

    lb = leaderboard(engine, suite, metric, tasks, suite_version)
    res = None
    if lb.attrs.get("score") and lb.attrs.get("tasks"):
        res = resolution(engine, suite, lb.attrs["suite_version"], lb.attrs["tasks"], metric)
    return to_markdown(lb, decimals=decimals, include_cost=include_cost, resolution=res)


def _plain_markdown(df: pd.DataFrame, decimals: int) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_escape(c) for c in cols) + " |", "|" + "|".join([" --- "] * len(cols)) + "|"]
    for row in df.itertuples(index=False):
        cells = [_fmt(v, decimals) if isinstance(v, float) else ("" if v is None or v is pd.NA else _md_escape(str(v)))
                 for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
