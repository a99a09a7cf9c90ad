"""kdbench leaderboard: a read-only Streamlit view of the run store.

    streamlit run leaderboard_app/app.py -- --db PATH_OR_URL      (or KDBENCH_DB; default runs.db)

The store is opened read-only (common.open_store). Served on 127.0.0.1 with no usage statistics
by .streamlit/config.toml beside this file, which streamlit reads from any working directory
(`kdbench leaderboard` passes the same as flags); README.md, "Sharing the leaderboard".

Pages (sidebar): Leaderboard, Fidelity vs diversity, Run detail, Compare, Objectives. Each page is
one module under leaderboard_app/views/; queries live in kdbench/results/ (imported as kdbench.results).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `streamlit run` puts only this folder on sys.path
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from leaderboard_app import common  # noqa: E402
from leaderboard_app.views import PAGES  # noqa: E402

STORE_FREE_PAGES = {"Objectives"}  # pages that still show something without a store


def main() -> None:
    st.set_page_config(page_title="kdbench leaderboard", page_icon="📊", layout="wide")
    db = common.db_location()
    st.sidebar.title("kdbench")
    page = st.sidebar.radio("Page", list(PAGES), key="page", bind="query-params")
    ctx = common.open_store(db)
    if ctx is not None:
        st.sidebar.caption(f"Store (read-only): `{ctx.display}`")
    if ctx is None and page not in STORE_FREE_PAGES:
        return
    PAGES[page](ctx)


main()
