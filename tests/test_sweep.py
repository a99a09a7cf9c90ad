"""`kdbench sweep`: expansion, the dry run's command lines, skipping finished runs, two workers
on a tiny suite, a failed run that does not stop the sweep, and a sweep killed midway that is
started again (finished runs skipped, the interrupted one resumed)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.cli import main
from kdbench.errors import UserError
from kdbench.store import Metric, Run, open_engine
from kdbench.suites import get_suite
from kdbench.sweep import threads_per_worker
from kdbench.sweep_spec import SweepSpec, expand, sweep_id

ROOT = Path(__file__).resolve().parent.parent
try:
    from tests.fault_points import fault_env
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from fault_points import fault_env
    from tiny_models import make_tiny_pair


def test_expansion_applies_grids_where_they_belong():
    spec = SweepSpec(objectives=["kl", "csd"], seeds=[0, 1], params={"tau": ["1.0", "1.5"]}, tune={"lr": [1e-4, 3e-4]})
    jobs = expand(spec)
    # kl has no tau: 1 x 2 lr x 2 seeds; csd: 2 tau x 2 lr x 2 seeds
    assert len(jobs) == 4 + 8
    assert {j.setting for j in jobs} == {"kl", "csd(tau=1.0,w1=S,w2=S)", "csd(tau=1.5,w1=S,w2=S)"}
    assert len({j.key for j in jobs}) == len(jobs)
    micro = get_suite("micro")
    other = next(lr for lr in (1e-4, 3e-4) if lr != micro.train.lr)
    # the suite's own lr is the standard version; the other grid point is labelled
    assert {j.label for j in jobs} == {f"{micro.version}+lr={other:g}", micro.version}
    assert sweep_id(jobs) == sweep_id(list(reversed(jobs)))  # the same sweep, whatever the order


def test_a_sweep_passes_its_sampler_to_every_job():
    jobs = expand(SweepSpec(objectives=["kl", "csd_ss"], seeds=[0, 1], run={"sampler": "gkd(lmbda=0.5)"}))
    assert {j.setting for j in jobs} == {"kl+gkd(lmbda=0.5)", "csd(tau=1.0,w1=S,w2=S)+gkd(lmbda=0.5)"}
    assert all(j.run_config(None, None).sampler == "gkd(lmbda=0.5)" for j in jobs)
    off = expand(SweepSpec(objectives=["kl", "csd_ss"], seeds=[0, 1]))
    assert not {j.key for j in jobs} & {j.key for j in off}  # other experiments than the off-policy ones
    with pytest.raises(UserError, match="unknown sampler"):
        expand(SweepSpec(objectives=["kl"], seeds=[0], run={"sampler": "imitdk"}))


def test_gpus_per_run_makes_each_job_one_run_on_that_many_processes(capsys):
    jobs = expand(SweepSpec(objectives=["kl"], seeds=[0, 1], gpus_per_run=2))
    assert {j.run_config(None, None).num_processes for j in jobs} == {2}
    assert {j.key for j in jobs} == {j.key for j in expand(SweepSpec(objectives=["kl"], seeds=[0, 1]))}  # same runs
    assert main(["sweep", "--objectives", "kl", "--seeds", "0", "--gpus-per-run", "2", "--dry-run"]) == 0
    assert "--num-processes 2" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--gpus-per-run must be in \[1, 256\], got 0"):
        expand(SweepSpec(objectives=["kl"], seeds=[0], gpus_per_run=0))


def test_a_sweep_varies_the_sampler_beside_the_objective(tmp_path, capsys):
    jobs = expand(SweepSpec(objectives=["ce", "kl", "csd_ss"], samplers=["off", "imitkd", "gkd"], seeds=[0, 1]))
    # ce uses no teacher: off only; kl and csd under every sampler; 2 seeds each
    assert sorted({j.setting for j in jobs}) == sorted([
        "ce", "kl", "kl+imitkd", "kl+gkd(lmbda=0.5)", "csd(tau=1.0,w1=S,w2=S)", "csd(tau=1.0,w1=S,w2=S)+imitkd",
        "csd(tau=1.0,w1=S,w2=S)+gkd(lmbda=0.5)"])
    assert len(jobs) == 7 * 2 and len({j.key for j in jobs}) == len(jobs)
    # the off jobs are the off-policy sweep's own (same keys: a sweep skips what either already ran)
    off = expand(SweepSpec(objectives=["ce", "kl", "csd_ss"], seeds=[0, 1]))
    assert {j.key for j in off} == {j.key for j in jobs if "+" not in j.setting}
    assert {j.run_config(None, None).sampler for j in jobs} == {"off", "imitkd", "gkd"}
    spec = tmp_path / "s.yaml"
    spec.write_text("objectives: [kl]\nsamplers: [off, seqkd]\nseeds: [0]\n")
    assert main(["sweep", str(spec), "--dry-run", "--db", str(tmp_path / "r.db")]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("kdbench run")]
    assert len(lines) == 2 and sum("--sampler seqkd" in x for x in lines) == 1


@pytest.mark.parametrize("spec, message", [
    (dict(samplers=["off", "imitkd"], run={"sampler": "gkd"}), "--samplers and the run option sampler (--sampler) "
                                                               "both given"),
    (dict(samplers=["gkd", "gkd(lmbda=0.5)"]), "the sweep names the same run twice"),
    (dict(samplers=["imitkd", "imitkd"]), "--samplers lists 'imitkd' twice"),
    (dict(samplers=["imitdk"]), "unknown sampler 'imitdk'"),
    (dict(samplers=[]), "--samplers is empty"),
])
def test_a_mistaken_sampler_list_is_one_line(spec, message):
    with pytest.raises(UserError) as err:
        expand(SweepSpec(objectives=["kl"], seeds=[0], **spec))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dry_run_prints_one_kdbench_run_line_per_run(capsys):
    assert main(["sweep", "--objectives", "kl", "rkl", "csd_ss", "--seeds", "0", "1", "2", "--dry-run",
                 "--steps", "5", "--db", "x.db", "--keep-activations"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 9 and all(ln.startswith("kdbench run --objective ") for ln in lines)
    argv = shlex.split(lines[0])
    assert argv[argv.index("--steps") + 1] == "5" and argv[argv.index("--db") + 1] == "x.db"
    assert "--sweep-id" in argv and "--seed" in argv and "--keep-activations" in argv


def test_a_spec_file_and_its_mistakes(tmp_path, capsys):
    f = tmp_path / "sweep.yaml"
    f.write_text("objectives: [kl, csd_ts]\nseeds: [3]\nparams: {tau: [1.5]}\nrun: {steps: 2}\n")
    spec = SweepSpec.from_yaml(f)
    jobs = expand(spec)
    assert [(j.setting, j.seed) for j in jobs] == [("kl", 3), ("csd(tau=1.5,w1=T,w2=S)", 3)]
    f.write_text("objectives: [kl]\nseeds: [0]\nworkrs: 2\n")
    with pytest.raises(UserError, match="unknown key"):
        SweepSpec.from_yaml(f)
    assert main(["sweep", "--objectives", "nope", "--dry-run"]) == 2
    assert main(["sweep", "--objectives", "kl", "--tune", "warmup=1,2", "--dry-run"]) == 2
    assert main(["sweep", "--dry-run"]) == 2
    assert threads_per_worker(2) == max(1, (os.cpu_count() or 1) // 2)


def test_spec_files_read_numbers_strictly(tmp_path):
    """YAML 1.1 reads 1_5 as 15, 010 as 8 and 1e-4 as a string; a sweep file reads plain numbers only."""
    f = tmp_path / "sweep.yaml"
    f.write_text("objectives: [csd]\nseeds: [010, 2]\nparams: {tau: ['１.５']}\ntune: {lr: [1e-4, 3.0e-4]}\n"
                 "run: {steps: 3}\n")
    spec = SweepSpec.from_yaml(f)
    assert spec.seeds == ["010", 2] and spec.tune == {"lr": [1e-4, 3e-4]} and spec.run == {"steps": 3}
    jobs = expand(spec)
    assert sorted({j.seed for j in jobs}) == [2, 10]  # decimal, never octal
    assert {j.setting for j in jobs} == {"csd(tau=1.5,w1=S,w2=S)"}  # full-width digits read as Python reads them
    f.write_text("objectives: [csd]\nparams: {tau: [1_5]}\n")
    with pytest.raises(UserError, match="digit separators"):
        expand(SweepSpec.from_yaml(f))
    f.write_text("objectives: [kl]\nseeds: [0x1F]\n")
    with pytest.raises(UserError, match="seeds must be an integer, got '0x1F'"):
        expand(SweepSpec.from_yaml(f))


def test_a_spec_is_checked_whole_before_anything_runs(tmp_path, monkeypatch):
    """Nothing is prepared, opened or run for a sweep with a mistake anywhere in it."""
    import kdbench.sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDBENCH_DB", raising=False)

    def nothing(*a, **k):
        raise AssertionError("the sweep started before its specification was checked")

    monkeypatch.setattr(kdbench.sweep, "_prepare_suites", nothing)
    monkeypatch.setattr(kdbench.sweep, "_log_dir", nothing)
    for bad in (dict(seeds=[0, "a"]), dict(seeds=[True]), dict(workers=0), dict(run={"steps": "x"}),
                dict(params={"tau": []}), dict(params={"nosuch": [1]}), dict(tune={"lr": ["abc"]}),
                dict(tune={"lr": [float("nan")]}), dict(objectives="kl"), dict(objectives=["kl", None])):
        spec = SweepSpec(**{"objectives": ["kl", "csd"], **bad})
        with pytest.raises(UserError):
            kdbench.sweep.run_sweep(spec, out=lambda *_: None)
    assert not (tmp_path / "runs.db").exists()


class FakeJob:
    """A ``kdbench run`` process that finishes after two polls; remembers the GPU it was given."""

    def __init__(self, log, argv, env):
        self.gpu, self.polls, self.returncode = env.get("CUDA_VISIBLE_DEVICES"), 0, None
        log.append(self)

    def poll(self):
        self.polls += 1
        if self.polls >= 2:
            self.returncode = 0
        return self.returncode


def gpus_visible(monkeypatch, n: int):
    """A machine with ``n`` GPUs, as far as the sweep asks (no CUDA here)."""
    import torch

    import kdbench.device

    monkeypatch.setattr(kdbench.device, "resolve_device",
                        lambda name: torch.device("cpu") if n == 0 or name == "cpu" else torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_each_worker_owns_a_gpu_and_a_finished_jobs_gpu_goes_to_the_next(tmp_path, monkeypatch):
    import kdbench.sweep
    from kdbench.sweep import worker_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus_visible(monkeypatch, 3)
    assert worker_gpus("auto", 2) == ["0", "1"] and worker_gpus("cuda", 3) == ["0", "1", "2"]
    assert worker_gpus("cuda:1", 2) is None  # every job on the GPU asked for
    with pytest.raises(UserError, match="--workers 4 with 3 visible GPU"):
        worker_gpus("auto", 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb")  # a scheduler's choice is kept
    assert worker_gpus("auto", 2) == ["GPU-aa", "GPU-bb"]
    with pytest.raises(UserError, match="with 2 visible GPU"):
        worker_gpus("auto", 3)
    gpus_visible(monkeypatch, 0)
    assert worker_gpus("auto", 4) is None
    with pytest.raises(UserError, match="--gpus-per-run 2 needs the jobs on CUDA"):
        worker_gpus("auto", 1, per_run=2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    gpus_visible(monkeypatch, 5)  # --gpus-per-run 2: each worker two GPUs, the fifth idle
    assert worker_gpus("auto", 2, per_run=2) == ["0,1", "2,3"]
    with pytest.raises(UserError, match="gives each worker 2 GPUs of its own; use --workers 2 or fewer"):
        worker_gpus("auto", 3, per_run=2)

    gpus_visible(monkeypatch, 2)
    started: list[FakeJob] = []
    live: list[FakeJob] = []

    def popen(argv, stdout, stderr, env):
        job = FakeJob(started, argv, env)
        assert job.gpu not in {j.gpu for j in live if j.returncode is None}, "two running jobs on one GPU"
        live.append(job)
        return job

    monkeypatch.setattr(kdbench.sweep.subprocess, "Popen", popen)
    monkeypatch.setattr(kdbench.sweep, "_prepare_suites", lambda *a, **k: {})
    lines: list[str] = []
    spec = SweepSpec(objectives=["kl", "rkl"], seeds=[0, 1, 2], workers=2, db=str(tmp_path / "runs.db"))
    assert kdbench.sweep.run_sweep(spec, out=lines.append) == 0
    assert len(started) == 6 and {j.gpu for j in started} == {"0", "1"}
    assert "one GPU each (0, 1)" in lines[0] and sum(" on GPU " in ln for ln in lines) == 6


# ---------------------------------------------------------------------------- real sweeps on a tiny suite


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    teacher, student = make_tiny_pair(tmp / "models")
    data = tmp / "data" / "gsm8k"
    data.mkdir(parents=True)
    for name, n in (("train", 24), ("test", 2)):
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n" for i in range(n)))
    plugin = tmp / "broken.py"
    plugin.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("always_nan", behaviour="balanced", paper="test plug-in")
        def always_nan(s, t):
            """NaN everywhere: the run fails, the sweep goes on."""
            return (s - t).sum(-1) * float("nan")
    '''))
    flags = ["--suite", "paper-task-gsm8k", "--teacher", str(teacher), "--student", str(student),
             "--data-dir", str(tmp / "data"), "--steps", "2", "--eval-limit", "1", "--no-save"]
    # a cache of its own: the sweeps' logs (read below) and fine-tuned tiny teachers stay in the test
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "KDBENCH_CHECKPOINT_EVERY_S": "0", "KDBENCH_CACHE": str(tmp / "cache")}
    return {"tmp": tmp, "flags": flags, "plugin": plugin, "env": env}


def sweep(tiny, db, *extra, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "kdbench", "sweep", *tiny["flags"], "--db", str(db), *extra],
                          env={**tiny["env"], **(env or {})}, capture_output=True, text=True, timeout=900, **kw)


def runs(db):
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        out = [(r.id, r.setting, r.seed, r.status, r.sweep_id, r.config_hash)
               for r in s.scalars(select(Run).where(Run.role == "distilled").order_by(Run.id))]
    engine.dispose()
    return out


def config(db, run_id):
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        out = s.get(Run, run_id).config
    engine.dispose()
    return out


def metrics(db, run_id):
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        out = sorted((m.task, m.metric, m.seed if m.seed is not None else -1, m.value)
                     for m in s.scalars(select(Metric).where(Metric.run_id == run_id)))
    engine.dispose()
    return out


def test_two_workers_skip_finished_runs_and_survive_a_failed_one(tiny):
    db = tiny["tmp"] / "two.db"
    objectives = ["kl", "rkl", f"{tiny['plugin']}:always_nan"]
    res = sweep(tiny, db, "--objectives", *objectives, "--seeds", "0", "--workers", "2", "--keep-activations")
    assert res.returncode == 1, res.stdout + res.stderr  # one run failed: the sweep says so in its exit code
    out = res.stdout
    assert "2 worker(s)" in out and "failed: always_nan seed 0" in out and "3/3 done, 1 failed" in out
    got = runs(db)
    assert sorted((s, st) for _, s, _, st, _, _ in got) == [("always_nan", "failed"), ("kl", "finished"),
                                                          ("rkl", "finished")]
    assert len({sid for *_, sid, _ in got}) == 1  # one sweep id
    again = sweep(tiny, db, "--objectives", "kl", "rkl", "--seeds", "0", "--workers", "2")
    assert again.returncode == 0 and "2 already finished, 0 to run" in again.stdout
    assert len(runs(db)) == 3
    # kl's run as if made on another machine kind (another fine-tuned teacher): not this machine's result
    engine = open_engine(str(db))
    with Session(engine) as s:
        kl = s.scalars(select(Run).where(Run.setting == "kl")).one()
        kl.config = {**kl.config, "reference_fingerprint": "0123456789abcdef"}
        s.commit()
    engine.dispose()
    # two workers again: one thread per worker, as in the first sweep (the thread count changes
    # a matmul's summation order, and with it the bits)
    third = sweep(tiny, db, "--objectives", "kl", "rkl", "--seeds", "0", "--workers", "2")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "1 finished run(s) in the store were made under another teacher" in third.stdout
    assert "1 already finished, 1 to run" in third.stdout
    kls = [r for r in runs(db) if r[1] == "kl"]  # one configuration, two teachers: two experiments
    assert len(runs(db)) == 4 and len(kls) == 2 and kls[1][3] == "finished" and kls[0][5] == kls[1][5]
    # the first sweep kept the student's activations, the third recomputed them (the default): the
    # same teacher in fact, so the same numbers bit for bit -- the flag trades memory for time only
    assert [config(db, r[0])["activation_checkpointing"] for r in kls] == [False, True]
    assert [config(db, r[0])["torch_threads"] for r in kls] == [1, 1]
    assert metrics(db, kls[0][0]) == metrics(db, kls[1][0]) and len(metrics(db, kls[0][0])) > 5


def test_a_killed_sweep_started_again_resumes_the_interrupted_run(tiny):
    db = tiny["tmp"] / "killed.db"
    args = [sys.executable, "-m", "kdbench", "sweep", *tiny["flags"], "--db", str(db), "--objectives", "kl", "csd",
            "--seeds", "0"]
    proc = subprocess.Popen(args, env=fault_env(tiny["env"], "training@2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # the first run reaches step 2 (step 1 checkpointed), then waits
        got = runs(db) if db.exists() else []
        if got and got[0][3] == "running":
            engine_log = list((Path(tiny["env"]["KDBENCH_CACHE"]) / "sweeps").glob("*/*.log"))
            if any("KDBENCH_FAULT_POINT" in p.read_text(errors="replace") for p in engine_log):
                break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the sweep's first run never reached its fault point")
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker die together
    proc.wait()
    first = runs(db)
    assert len(first) == 1 and first[0][3] == "running"  # a dead process's row
    res = sweep(tiny, db, "--objectives", "kl", "csd", "--seeds", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 to resume" in res.stdout and f"resume run {first[0][0]}" in res.stdout
    final = runs(db)
    assert [(i, s, st) for i, s, _, st, _, _ in final] == [(first[0][0], "kl", "finished"),
                                                           (final[1][0], "csd(tau=1.0,w1=S,w2=S)", "finished")]
