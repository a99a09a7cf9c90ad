"""benchmarks/bench_data_parallel.py, two processes x one thread against one process x two
threads, cannot rot: its --tiny run (the tests' tiny pair on the micro suite's data, 2 measured
steps per arm) completes and reports both arms, their ratio and where the two-process step's
time goes, adding up. The benchmark itself is run by hand on an idle machine (its docstring)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_data_parallel.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_data_parallel") / "dp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["results"], proc.stdout


@pytest.mark.slow
def test_both_arms_train_the_suites_batch_and_the_step_adds_up(tiny_run):
    results, stdout = tiny_run
    assert (results["steps"], results["tiny"]) == (2, True)
    for arm, world in (("1x2", 1), ("2x1", 2)):
        r = results[arm]
        assert r["tokens_per_s"] > 0 and r["s_per_step"] > 0, arm
        assert r["parallel"]["world"] == world and r["parallel"]["global_batch"] == results["batch_size"], arm
    assert results["2x1 / 1x2 tokens/s"] == pytest.approx(
        results["2x1"]["tokens_per_s"] / results["1x2"]["tokens_per_s"], rel=1e-2)
    ranks = results["2x1"]["per_rank_s_per_step"]
    assert len(ranks) == 2
    for b in ranks:
        parts = b["compute"] + b["wait"] + b["all-reduce"] + b["loss all-reduce"]
        assert math.isclose(parts, b["step"], abs_tol=1e-3) and b["compute"] > 0 and b["in flight"] > 0
    assert sum(b["tokens"] for b in ranks) > 0
    assert "| 2x1 |" in stdout and "where a step goes" in stdout
