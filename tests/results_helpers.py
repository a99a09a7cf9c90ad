"""Helpers shared by the kdbench.results tests (test_results.py, test_results_paired_store.py)."""

from __future__ import annotations

import pandas as pd

P_FLOOR = 2 / 2001  # the smallest p of 2000 bootstrap replicates


def row(df: pd.DataFrame, setting: str) -> pd.Series:
    hit = df[df.setting == setting]
    assert len(hit) == 1, f"{setting!r} not exactly once in {list(df.setting)}"
    return hit.iloc[0]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]
