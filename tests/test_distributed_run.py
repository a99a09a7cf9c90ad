"""``kdbench run`` on several processes (kdbench/distributed.py): ``--num-processes 2`` on the
CPU (gloo, one thread each) starts two ranks through torch's launcher; rank 0 prepares, writes
and evaluates, both train the suite's batch split between them. One run row, and its training
is the one-process run's within float32 rounding (the trainer's split: tests/test_world_size.py);
``--accumulation 2`` on one process likewise. Mistakes are one line before any process starts.
A rank killed mid-training ends the run within a minute, recorded ``failed`` with the rank
named; every process of the run killed at once (a lost machine) and ``--resume`` on one or two
processes (a sharded run: on two) gives the uninterrupted run (fault points: tests/faults/sitecustomize.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.store import Run, open_engine

ROOT = Path(__file__).resolve().parent.parent
try:
    from tests.fault_points import fault_env
    from tests.store_helpers import distilled_run
    from tests.tiny_models import gsm8k_run_world
except ImportError:  # run from inside tests/
    from fault_points import fault_env
    from store_helpers import distilled_run
    from tiny_models import gsm8k_run_world

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.slow


def kdbench(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdbench", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def result_of(db: Path) -> dict:
    """The run's status, error and config, its logged training losses ``(step, loss)`` and its
    number of samples (across processes the weights agree within float rounding, so the
    samples' texts may differ; their number may not)."""
    run = distilled_run(db)
    curve = sorted((step, loss) for split, step, loss in run["curve"] if split == "train")
    return {"status": run["status"], "error": run["error"], "config": run["config"], "curve": curve,
            "samples": len(run["samples"])}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    args = ["run", "--objective", "kl", *gsm8k_run_world(tmp)]
    out = {"tmp": tmp, "args": args}
    for name, extra in (("one", []), ("two", ["--num-processes", "2"]), ("accumulated", ["--accumulation", "2"]),
                        ("sharded", ["--num-processes", "2", "--fsdp"])):
        proc = kdbench(*args, *extra, "--db", str(tmp / f"{name}.db"))
        out[name] = proc
    # accelerate's launcher: its --multi_gpu mode starts the ranks through torch's (on the CPU too;
    # its --cpu mode is one process, several only through MPI)
    out["accelerate"] = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdbench", *args, "--db", str(tmp / "accelerate.db")],
        env=ENV, capture_output=True, text=True, timeout=300)
    return out


def _close(a: list, b: list, rel: float) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) <= rel * abs(y) for (_, x), (_, y) in zip(a, b))


def test_two_processes_give_one_run_that_trains_as_one_process(world):
    assert world["one"].returncode == 0, world["one"].stderr[-2000:]
    assert world["two"].returncode == 0, world["two"].stderr[-3000:]
    one, two = result_of(world["tmp"] / "one.db"), result_of(world["tmp"] / "two.db")  # one row each
    assert two["status"] == "finished" and two["config"]["processes"] == 2
    assert two["config"]["parallel"]["world"] == 2 and two["config"]["parallel"]["global_batch"] == 8
    assert one["config"]["parallel"]["world"] == 1
    assert one["curve"] and _close(two["curve"], one["curve"], 1e-5), (two["curve"], one["curve"])
    assert two["samples"] == one["samples"] > 0  # evaluated once, by rank 0, on every prompt
    # (the logged point is the mean loss of the 4 steps: the suite logs every 25 steps and at the last)
    assert "starting 2 processes" in world["two"].stdout


def test_fsdp_shards_the_student_and_trains_as_one_process(world):
    assert world["sharded"].returncode == 0, world["sharded"].stderr[-3000:]
    one, sharded = result_of(world["tmp"] / "one.db"), result_of(world["tmp"] / "sharded.db")
    assert sharded["status"] == "finished" and sharded["config"]["parallel"]["sharding"].startswith("fsdp2")
    assert _close(sharded["curve"], one["curve"], 1e-5), (sharded["curve"], one["curve"])
    assert sharded["samples"] == one["samples"]


def test_accelerate_launch_starts_the_same_run(world):
    assert world["accelerate"].returncode == 0, world["accelerate"].stderr[-3000:]
    one, acc = result_of(world["tmp"] / "one.db"), result_of(world["tmp"] / "accelerate.db")
    assert acc["status"] == "finished" and acc["config"]["processes"] == 2
    assert _close(acc["curve"], one["curve"], 1e-5) and acc["samples"] == one["samples"]


def test_accumulation_trains_as_the_whole_batch(world):
    assert world["accumulated"].returncode == 0, world["accumulated"].stderr[-2000:]
    one, acc = result_of(world["tmp"] / "one.db"), result_of(world["tmp"] / "accumulated.db")
    assert acc["config"]["accumulation"] == 2 and acc["config"]["parallel"]["accumulation"] == 2
    assert _close(acc["curve"], one["curve"], 1e-5), (acc["curve"], one["curve"])


@pytest.mark.parametrize("extra, message", [
    (["--num-processes", "5", "--accumulation", "2"], "2 = 10 parts of a step; suite paper-task-gsm8k's batch has "
                                                      "only 8 examples"),
    (["--num-processes", "0"], "--num-processes must be at least 1"),
    (["--fsdp"], "--fsdp shards the student across processes: give --num-processes N (N >= 2)"),
])
def test_a_split_the_batch_cannot_hold_is_one_line_before_any_process(world, extra, message):
    db = world["tmp"] / "refused.db"
    proc = kdbench(*world["args"], *extra, "--db", str(db))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "starting" not in proc.stdout and not db.exists()


def test_a_resume_that_cannot_be_is_refused_before_any_process_starts(world):
    proc = kdbench("run", "--resume", "3", "--num-processes", "2", "--db", str(world["tmp"] / "one.db"))
    assert proc.returncode == 2 and "run 3 is finished; only interrupted (or failed) runs can be resumed" in proc.stderr
    assert "starting" not in proc.stdout


def _start_until(world, db: Path, point: str, rank: int | None = None, checkpoint_every_step: bool = True,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, dict[int, int]]:
    """``--num-processes 2`` started in its own process group, held at the fault ``point`` (on
    ``rank`` only, or on both) until the held ranks have said so; returns the launcher and
    {rank: pid} of the held ranks."""
    env = {**fault_env(ENV, point), **({"KDBENCH_CHECKPOINT_EVERY_S": "0"} if checkpoint_every_step else {}),
           **({"KDBENCH_FAULT_RANK": str(rank)} if rank is not None else {})}
    ranks = 1 if rank is not None else 2
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", *world["args"], "--num-processes", "2", *extra,
                             "--db", str(db)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        for r, pid in re.findall(r"KDBENCH_FAULT_POINT \S+ rank=(\d+) pid=(\d+)", line):
            pids[int(r)] = int(pid)
        if len(pids) == ranks:
            return proc, pids
        assert time.monotonic() < deadline, "the ranks never reached their fault point"
    pytest.fail(f"the run ended before its fault point {point} (exit {proc.wait()})")


def test_a_killed_rank_ends_every_rank_and_the_run_is_recorded_failed(world):
    db = world["tmp"] / "killed.db"
    # rank 0 goes on into the next step's all-reduce, and finds its peer gone. (Checkpoints at the
    # suite's interval, as runs take them: a checkpoint written after every step would leave rank
    # 0 outside any collective when the launcher, seeing rank 1 die, stops it -- then the run is
    # recorded interrupted, resumable, instead of failed.)
    proc, pids = _start_until(world, db, "training@2", rank=1, checkpoint_every_step=False)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.stderr.close()
    assert time.monotonic() - t0 < 60 and rc != 0
    run = result_of(db)
    assert run["status"] == "failed" and run["error"].startswith("rank 1 of 2 stopped during the run"), run


@pytest.mark.parametrize("started, resumed", [
    ((), ()),                                        # 2 processes, resumed on one
    ((), ("--num-processes", "2")),                  # ... on two
    (("--fsdp",), ("--num-processes", "2")),         # sharded: every rank its shards, resumed on two
], ids=["ddp-on-1", "ddp-on-2", "fsdp-on-2"])
def test_every_process_killed_then_resumed_gives_the_uninterrupted_run(world, started, resumed):
    db = world["tmp"] / f"resumed{'-'.join(started + resumed)}.db"
    proc, pids = _start_until(world, db, "training@2", extra=started)
    # every process of the run at once, as a lost machine: the launcher, torch's agent, the ranks
    # (the agent starts the ranks in sessions of their own)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        run_id = s.scalars(select(Run.id).where(Run.role == "distilled")).one()
    engine.dispose()
    done = kdbench("run", "--resume", str(run_id), *resumed, "--db", str(db), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, one = result_of(db), result_of(world["tmp"] / "one.db")
    assert resumed["status"] == "finished" and resumed["samples"] == one["samples"]
    assert _close(resumed["curve"], one["curve"], 1e-5), (resumed["curve"], one["curve"])
