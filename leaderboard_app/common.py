"""Shared plumbing of the leaderboard app: which store, a read-only engine, cached queries, pickers."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from kdbench import results as R
from kdbench.errors import UserError
from kdbench.store import DB_ENV_VAR, DEFAULT_DB, open_engine, resolve_url

# teacher and undistilled student are reference rows (evaluated once per suite version), not ranked
ROLE_LABEL = {"teacher": "reference", "student-init": "reference", "distilled": "distilled"}


def db_location(argv: list[str] | None = None) -> str:
    """``-- --db PATH_OR_URL`` after ``streamlit run app.py``, else $KDBENCH_DB, else runs.db in the cwd."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--db")
    ns, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return ns.db or os.environ.get(DB_ENV_VAR) or DEFAULT_DB


@st.cache_resource(show_spinner=False)
def _engine(url: str):
    return open_engine(url, readonly=True)  # sqlite: mode=ro; the app never writes


@st.cache_data(show_spinner=False, max_entries=512)
def _cached(url: str, fingerprint: tuple, fname: str, args: tuple, kwargs: tuple) -> Any:
    # keyed by the store URL and its fingerprint: new or finished runs invalidate every entry
    return getattr(R, fname)(_engine(url), *args, **dict(kwargs))


@dataclass
class Ctx:
    url: str
    display: str
    fingerprint: tuple
    state: str

    def q(self, fname: str, *args: Any, **kwargs: Any) -> Any:
        """A cached call of ``kdbench.results.<fname>(engine, *args, **kwargs)``."""
        args = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        kw = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        return _cached(self.url, self.fingerprint, fname, args, kw)


def _display(url: str) -> str:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url.split("@")[-1]


def open_store(db: str) -> Ctx | None:
    """The store context, or None after an st.info explaining why there is nothing to show."""
    url = resolve_url(db)
    display = _display(url)
    how = ("Start the app with `streamlit run leaderboard_app/app.py -- --db PATH_OR_URL` "
           f"or set `{DB_ENV_VAR}`; `kdbench run` writes the store.")
    try:
        engine = _engine(url)
        state = R.store_state(engine)
        fingerprint = R.store_fingerprint(engine) if state != "no_schema" else ()
    except UserError as exc:
        st.info(f"No results to show: {exc}.\n\n{how}")
        return None
    except Exception as exc:  # not a database, unreadable, driver missing
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        st.info(f"Cannot read the run store at `{display}`: {first}\n\n{how}")
        return None
    if state == "no_schema":
        st.info(f"The store at `{display}` has no kdbench tables yet (an empty file, or not a kdbench store). "
                f"Run `kdbench run ...` to record results.\n\n{how}")
        return None
    if state == "empty":
        st.info(f"The run store at `{display}` has no runs yet. Run `kdbench run ...` to record one.")
        return None
    return Ctx(url=url, display=display, fingerprint=fingerprint, state=state)


def show_failed(ctx: Ctx, suite: str | None = None, version: str | None = None, *, expanded: bool = False) -> None:
    """A warning with the count of failed runs and an expander listing their reasons."""
    failed = ctx.q("failed_runs", suite, version)
    if failed.empty:
        return
    where = f" in {suite} v{version}" if suite else ""
    st.warning(f"{len(failed)} failed run(s){where}: not counted in any table.")
    with st.expander("Failed runs and their errors", expanded=expanded):
        st.dataframe(failed[["run_id", "setting", "role", "suite", "suite_version", "seed", "error"]],
                     hide_index=True, width="stretch", placeholder="–")


def no_finished_runs(ctx: Ctx) -> None:
    st.info("No finished runs yet: tables appear when a run finishes. "
            "Failed and running runs are listed below.")
    show_failed(ctx, expanded=True)
    running = ctx.q("list_runs", None, "running")
    if not running.empty:
        st.caption(f"{len(running)} run(s) still running: " + ", ".join(f"#{i}" for i in running.run_id))


def suite_picker(ctx: Ctx, prefix: str, suite_box=None, version_box=None) -> tuple[str, str] | None:
    """Suite and suite-version selectors over suites with finished runs. The version selector is always
    shown (numbers of different versions are never mixed): standard versions first, newest first, then
    quick-run versions (``1+steps=3,eval_limit=3``), which get a warning when picked."""
    suites = ctx.q("list_suites")
    suites = suites[suites.n_finished > 0]
    if suites.empty:
        no_finished_runs(ctx)
        return None
    names = list(dict.fromkeys(suites.suite))
    suite = (suite_box or st).selectbox("Suite", names, key=f"{prefix}_suite")
    versions = list(suites[suites.suite == suite].suite_version)  # standard first (kdbench.results.list_suites)
    default = ctx.q("default_version", suite)
    version = (version_box or suite_box or st).selectbox(
        "Suite version", versions, index=versions.index(default) if default in versions else 0,
        key=f"{prefix}_version", format_func=R.version_label,
        help="Results of different suite versions are never mixed. A quick-run version (+steps=…, eval_limit=…) "
             "used a smaller budget than the suite's standard one.")
    base, fp = R.split_version(version)
    if fp is not None:
        st.caption(f"Suite version {base} holds runs made under more than one teacher (reference fingerprints; "
                   f"e.g. the suite's teacher fine-tuned on another machine kind). This is the group of teacher "
                   f"`{fp}`; the others are listed beside it and never mixed with it.")
    if R.is_quick_version(version):
        budget = ", ".join(base.split("+", 1)[1].split(","))
        st.warning(f"Suite version `{version}` holds quick runs ({budget}): a reduced budget, not comparable "
                   "with the suite's standard version.", icon="⚠️")
    return suite, version


def fmt(v: Any, decimals: int = 2) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):.{decimals}f}"


FLAG_SCORES = {"degenerate"}  # per-sample 0/1 flags (kdbench.evaluation.protocol)


def fmt_score(name: str, v: Any) -> str:
    """``name value`` of a per-sample score: flags as yes / no, integers (word counts) as integers,
    other numbers to 2 decimals."""
    if name in FLAG_SCORES and isinstance(v, (int, float)) and v in (0, 1):
        return f"{name} {'yes' if v else 'no'}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{name} {v}"
    return f"{name} {fmt(v)}"


def when(ts: Any) -> str:
    """A stored UTC timestamp to the second: ``2026-11-30 03:58:40 UTC``; '–' when missing."""
    if ts is None or ts is pd.NA or (isinstance(ts, float) and math.isnan(ts)):
        return "–"
    try:
        return pd.Timestamp(ts).strftime("%Y-%m-%d %H:%M:%S") + " UTC"
    except (ValueError, TypeError):
        return str(ts)


def text_block(text: Any) -> str:
    """A model output for st.text: runs of blank lines collapsed to one (sampled outputs of a weak student
    can hold dozens), otherwise verbatim; '–' when missing."""
    if not isinstance(text, str):
        return "–"
    return _BLANK_LINES.sub("\n\n", text)


_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")


def metric_help(metric: str) -> str:
    return f"{metric}: {'lower' if R.lower_is_better(metric) else 'higher'} is better"


def setting_label(setting: str) -> str:
    return {"teacher": "teacher (reference)", "student-init": "student-init (reference)"}.get(setting, setting)
