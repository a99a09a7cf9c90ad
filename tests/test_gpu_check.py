"""benchmarks/gpu_check.py, the prepared GPU check, cannot rot: its --tiny run passes on the CPU.

The check is run once on a GPU machine by hand (docs/performance.md, "GPU check"); here its
every section runs on the CPU with tiny shapes, and its assertion helper is shown to turn a bad
value into a non-zero exit code."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["0_environment", "1_correctness", "2_training", "3_generation", "4_head_precision"]


def _load():
    if "kdbench_gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kdbench_gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["kdbench_gpu_check"]


def _numbers(x, path="$"):
    """Every number in a JSON value, with where it is."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.mark.slow
def test_tiny_run_passes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KDBENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["finished"] and data["exit_code"] == 0
    assert data["failed_assertions"] == [] and data["incomplete"] == []
    assert sorted(data["sections"]) == SECTIONS
    assert all(s["status"] == "done" for s in data["sections"].values()), {k: s["status"] for k, s in
                                                                           data["sections"].items()}
    bad = [(p, v) for p, v in _numbers(data) if not math.isfinite(v)]
    assert not bad, bad[:5]
    # what the run is for is there: every objective's start-up check, every training arm, both generators
    assert len(data["checks"]) > 20 and all(c["ok"] for c in data["checks"])
    startup = data["sections"]["1_correctness"]["startup_check"]
    assert {k for k in startup if k != "wall_s"} and all(v["passed"] for k, v in startup.items() if k != "wall_s")
    arms = data["sections"]["2_training"]["arms"]
    for arm in ("a_shipped", "b_no_checkpointing", "c_tuned", "d_live_teacher", "e_hand_loop"):
        assert arms[arm]["tokens_per_s"] > 0 and len(arms[arm]["first_losses"]) == 3, arm
    assert "f_trl" in arms  # measured, or skipped with the reason when trl is not installed
    gen = data["sections"]["3_generation"]
    assert gen["student_batch2"]["kdbench"]["tokens_per_s"] > 0
    assert gen["teacher_batch4"]["hf_generate"]["tokens_per_s"] > 0
    assert data["sections"]["4_head_precision"]["modes"]["tf32"]["skipped"]  # CUDA only


def test_a_failed_assertion_makes_the_exit_code_non_zero(tmp_path, capsys):
    gpu_check = _load()
    report = gpu_check.Report(tmp_path / "out.json", {"test": True})
    assert report.check_le("fine", 1e-6, 1e-5) and report.finish() == 0
    assert not report.check_le("cpu_vs_device: hidden states (rel.)", 3e-3, 1e-4)
    assert not report.check_le("not finite", float("nan"), 1.0)   # a NaN never passes
    assert not report.check("bitwise", False)
    assert report.finish() == 1
    data = json.loads((tmp_path / "out.json").read_text())
    assert [f["name"] for f in data["failed_assertions"]] == ["cpu_vs_device: hidden states (rel.)", "not finite",
                                                              "bitwise"]
    assert data["exit_code"] == 1 and data["failed_assertions"][1]["value"] == "nan"
    assert "ASSERTION FAILED: cpu_vs_device: hidden states" in capsys.readouterr().err


def test_a_time_box_cut_is_not_a_pass(tmp_path):
    gpu_check = _load()
    report = gpu_check.Report(tmp_path / "out.json", {})
    report.incomplete("2_training: time box of 1 s ran out")
    assert report.finish() == 3
