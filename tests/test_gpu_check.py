"""benchmarks/gpu_check.py, the prepared GPU check, cannot rot: its --tiny run passes on the CPU.

The check is run once on a GPU machine by hand (docs/performance.md, "GPU check"); here its
every section runs on the CPU with tiny shapes (section 5 through ``torch.distributed.run`` and
gloo: the plain, DDP and FSDP2 arms' losses agree), its assertion helper is shown to turn a bad
value into a non-zero exit code, section 5 is skipped, not failed, without torch.distributed,
and benchmarks/dist_check.py runs alone (its own one-process group) in float32 to 1e-5."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
DIST_SCRIPT = ROOT / "benchmarks" / "dist_check.py"
SECTIONS = ["0_environment", "1_correctness", "2_training", "3_generation", "4_head_precision", "5_distributed"]
DIST_ARMS = ("a_plain", "b_ddp", "c_fsdp2")


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
    _check_distributed(data["sections"]["5_distributed"], data["checks"])
    assert set(data["summary"]["distributed"]["tokens_per_s"]) == set(DIST_ARMS)


def _check_distributed(dist, checks, *, precision=None):
    """Section 5's (or dist_check's own) record: gloo, one process, three arms trained the same
    steps, (b)'s and (c)'s losses equal (a)'s within the tolerance of what they ran."""
    env = dist["environment"]
    assert env["backend"] == "gloo" and env["world_size"] == 1 and env["device"] == "cpu", env
    assert env["torch"] and env["fsdp2"] is True and env["nccl"] is None  # no NCCL version on the CPU
    setup = dist["setup"]
    assert setup["shapes"] == "tiny" and setup["teacher"] == "live, replicated"
    if precision is not None:
        assert setup["precision"] == precision
    rtol = {"bf16 autocast": 1e-3, "float32": 1e-5}[setup["precision"]]
    steps = setup["warmup_steps"] + setup["timed_steps"]
    arms = dist["arms"]
    assert set(arms) == set(DIST_ARMS)
    for name in DIST_ARMS:
        arm = arms[name]
        assert "skipped" not in arm, (name, arm)
        assert arm["tokens_per_s"] > 0 and arm["s_per_step"] > 0 and arm["host_rss_peak_mb"] > 0, name
        assert len(arm["losses"]) == steps and arm["first_losses"] == arm["losses"][:3], name
        assert all(math.isfinite(x) for x in arm["losses"]), name
        assert arm["parallel"]["world"] == 1 and arm["parallel"]["accumulation"] == 1, name
    assert arms["b_ddp"]["wrapper"] == "DistributedDataParallel(StudentBody)"
    assert arms["c_fsdp2"]["param_types"] == ["DTensor"] and "fsdp2" in arms["c_fsdp2"]["parallel"]["sharding"]
    agreement = dist["agreement"]
    assert agreement["reference"] == "a_plain" and agreement["rtol"] == rtol
    assert agreement["precision"] == setup["precision"]
    for name in ("b_ddp", "c_fsdp2"):
        assert agreement[name]["max_rel_diff"] <= rtol, (name, agreement[name])
        assert len(agreement[name]["per_step_rel_diff"]) == steps
    names = [c["name"] for c in checks if c["name"].startswith("distributed")]
    assert len(names) == 7 and all(c["ok"] for c in checks if c["name"].startswith("distributed")), names


@pytest.mark.slow
def test_dist_check_runs_alone_in_float32(tmp_path):
    """No launcher: a one-process gloo group of its own; float32, so the arms agree to 1e-5."""
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(DIST_SCRIPT), "--tiny", "--float32", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["finished"] and data["exit_code"] == 0 and data["failed_assertions"] == []
    dist = data["sections"]["distributed"]
    assert dist["status"] == "done" and dist["environment"]["launcher"].startswith("none")
    _check_distributed(dist, data["checks"], precision="float32")


def test_the_distributed_section_is_skipped_without_torch_distributed(tmp_path, monkeypatch):
    gpu_check = _load()
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    report = gpu_check.Report(tmp_path / "out.json", {})
    ctx = gpu_check.Ctx(args=None, device=torch.device("cpu"), tiny=True, shapes=None, report=report, tmp=tmp_path,
                        pairs=[])
    gpu_check.run_section(ctx, 5, gpu_check.section_distributed, 5.0)
    assert report.finish() == 0  # recorded, not failed, and nothing launched
    sec = json.loads((tmp_path / "out.json").read_text())["sections"]["5_distributed"]
    assert sec["status"] == "done" and "torch.distributed is not available" in sec["skipped"]
    assert "launch" not in sec


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
