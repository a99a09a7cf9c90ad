"""benchmarks/bench_onpolicy.py, the on-policy cost benchmark, cannot rot: its --tiny run (a tiny
random teacher/student pair on the micro suite's data, 2 measured steps per arm) completes and
reports every arm, where a step's time goes, its table and the targets as ratios it measured.

The benchmark itself is run by hand on an idle machine (its docstring); TRL's arms run where
``trl`` is installed and say so where it is not, and the distillm arm runs where kdbench has the
sampler."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_onpolicy.py"
STEP_ARMS = ("off-cache", "off-live", "imitkd")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_onpolicy") / "onpolicy.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["results"], proc.stdout


@pytest.mark.slow
def test_every_step_arm_is_measured_with_its_breakdown(tiny_run):
    results, _ = tiny_run
    arms = results["arms"]
    assert list(arms) == ["off-cache", "off-live", "imitkd", "distillm", "generate", "trl-gkd", "trl-distillation"]
    assert (results["steps"], results["warmup"], results["tiny"]) == (2, 1, True)
    for name in STEP_ARMS:
        r = arms[name]
        assert r["steps"] == 2 and r["s_per_step"] > 0 and r["tokens_per_s"] > 0 and r["counted_per_step"] > 0, name
        parts = (r["generation_s_per_step"] + r["teacher_s_per_step"] + r["validation_s_per_step"]
                 + r["student_s_per_step"])
        assert math.isclose(parts, r["s_per_step"], rel_tol=1e-9), name  # where the time goes adds up
        assert r["student_s_per_step"] > 0, name
    assert arms["off-cache"]["teacher"] == "cache" and arms["off-live"]["teacher"] == "live"
    for off in ("off-cache", "off-live"):
        assert arms[off]["sampled_steps"] == 0 and arms[off]["generation_s_per_step"] == 0
    imitkd = arms["imitkd"]
    assert imitkd["sampler"] == "imitkd" and imitkd["sampled_steps"] == 2  # every step the student's
    assert imitkd["generation_s_per_step"] > 0 and imitkd["teacher_s_per_step"] > 0
    assert imitkd["generated_tokens_per_step"] > 0 and imitkd["sampler_cost"]["sampler_student_steps"] == 3


@pytest.mark.slow
def test_distillm_generates_and_replays_where_kdbench_has_it(tiny_run):
    from kdbench.engine.samplers import SAMPLERS

    results, stdout = tiny_run
    r = results["arms"]["distillm"]
    if "distillm" not in SAMPLERS:
        assert r.startswith("not available") and "distillm: not available" in stdout
        return
    assert r["s_per_step"] > 0 and r["schedule_budget"] == 3 and "p0=1" in r["sampler"]
    done = r["activity"]["all_steps"]
    assert done["fresh"] >= 1 and done["replayed"] >= 1  # it really sampled and replayed
    measured = r["activity"]["measured_steps"]
    assert measured["fresh"] + measured["replayed"] + measured["dataset"] == 2 and measured["dataset"] == 0
    assert f"distillm: {r['sampler']}" in stdout


@pytest.mark.slow
def test_generation_and_trl_arms_report_or_say_why(tiny_run):
    results, _ = tiny_run
    gen = results["arms"]["generate"]
    assert gen["student"] == "the imitkd arm's student after its steps"
    for key in ("hf_generate", "kdbench_decode", "in_training"):
        assert gen[key]["tokens_per_s"] > 0, key
    for name in ("trl-gkd", "trl-distillation"):
        r = results["arms"][name]
        try:
            import trl  # noqa: F401
        except ImportError:
            assert r.startswith("not installed"), r
        else:
            assert isinstance(r, dict) and (r.get("skipped") or r["s_per_step"] > 0), r


@pytest.mark.slow
def test_targets_are_printed_as_measured_ratios(tiny_run):
    results, stdout = tiny_run
    arms, ratios = results["arms"], results["ratios"]
    assert ratios["imitkd / off-cache"] == round(arms["imitkd"]["s_per_step"] / arms["off-cache"]["s_per_step"], 3)
    assert ratios["imitkd / off-live"] == round(arms["imitkd"]["s_per_step"] / arms["off-live"]["s_per_step"], 3)
    gen = arms["generate"]
    assert ratios["generation in training / hf_generate"] == round(
        gen["in_training"]["tokens_per_s"] / gen["hf_generate"]["tokens_per_s"], 3)
    assert "| arm | s/step | tok/s |" in stdout
    verdicts = [line for line in stdout.splitlines() if line.startswith("target ")]
    assert verdicts == results["verdicts"] and len(verdicts) == 8
    for line in verdicts:
        assert re.search(r"= (\d+\.\d+|-)x \(([<>]= [\d.]+x: (met|NOT met|not measured))", line) or \
            "(for reference)" in line, line
    assert any(re.search(r"imitkd step / off-cache step = \d+\.\d+x", line) for line in verdicts)
