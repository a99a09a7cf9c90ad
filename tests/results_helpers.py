"""Helpers shared by the kdbench.results tests (test_results.py, test_results_runs.py,
test_results_paired_store.py): the fixture store and the constants its closed forms need
(derived in test_results.py's docstring)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kdbench.store import open_engine

try:
    from tests.fixtures_store import build_fixture_store
    from tests.store_helpers import store_location
except ImportError:  # tests/ itself on sys.path
    from fixtures_store import build_fixture_store
    from store_helpers import store_location

P_FLOOR = 2 / 2001  # the smallest p of 2000 bootstrap replicates

H6 = 1.4841263  # CI half-width, distilled setting, spread 1
H3 = 2.4841377  # CI half-width, reference row, spread 1
SE = 0.8164966  # Welch standard error between two distilled settings, spread 1
T10 = 2.2281389
Z = 1.959964
PLUG_IN = math.sqrt(19 / 20)  # bootstrap SE / closed-form SE over 20 prompts
SD_P = math.sqrt(35 / 20)  # per unit slope difference: closed-form paired SE on one task


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = store_location(tmp_path_factory.mktemp("store"))
    ids = build_fixture_store(path)
    engine = open_engine(str(path), readonly=True)
    yield engine, ids, path
    engine.dispose()


def normal_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def row(df: pd.DataFrame, setting: str) -> pd.Series:
    hit = df[df.setting == setting]
    assert len(hit) == 1, f"{setting!r} not exactly once in {list(df.setting)}"
    return hit.iloc[0]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]
