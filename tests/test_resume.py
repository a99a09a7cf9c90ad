"""Crash safety end to end: real `kdbench run` processes killed (SIGKILL) during training, during
evaluation and while writing, or stopped with SIGTERM, then `kdbench run --resume`: the result
equals the uninterrupted run's, bit for bit on CPU, and the store holds one finished run with a
curve that has no step twice. Tiny random models with the real tokenizer, GSM8K-style data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.cli import main
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
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "KDBENCH_CHECKPOINT_EVERY_S": "0"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    args = ["run", "--objective", "csd", *gsm8k_run_world(tmp)]
    ref_db = tmp / "straight.db"
    proc = subprocess.run([sys.executable, "-m", "kdbench", *args, "--db", str(ref_db)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"tmp": tmp, "args": args, "reference": distilled_run(ref_db)}


def start_and_stop_at(world, db: Path, point: str, sig=signal.SIGKILL) -> int:
    """Start a real run, wait until it reaches the fault point, send ``sig``; return its exit code."""
    env = fault_env(ENV, point)
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", *world["args"], "--db", str(db)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if line.startswith("KDBENCH_FAULT_POINT"):
            break
        assert time.monotonic() < deadline, "the run never reached its fault point"
    else:
        pytest.fail(f"the run ended before its fault point {point} (exit {proc.wait()})")
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=120)
    finally:
        proc.stderr.close()


def resume(db: Path, run_id: int) -> subprocess.CompletedProcess:
    """``kdbench run --resume`` in its own process with the reference run's environment (thread
    count included: CPU float sums may depend on it, and the test asks for bit-identical)."""
    return subprocess.run([sys.executable, "-m", "kdbench", "run", "--resume", str(run_id), "--db", str(db),
                           "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)


def only_run(db: Path) -> Run:
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        (run,) = s.scalars(select(Run).where(Run.role == "distilled")).all()
        s.expunge_all()
    engine.dispose()
    return run


@pytest.mark.parametrize("point", ["training@2", "evaluation", "writing"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(world, point, capsys):
    db = world["tmp"] / f"killed-{point.replace('@', '-')}.db"
    assert start_and_stop_at(world, db, point) == -signal.SIGKILL
    killed = only_run(db)
    assert killed.status == "running"  # what the row says; the process is gone:
    assert main(["show", str(killed.id), "--db", str(db)]) == 0
    assert "interrupted" in capsys.readouterr().out
    proc = resume(db, killed.id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = distilled_run(db)
    ref = world["reference"]
    assert got["status"] == "finished" and got["id"] == killed.id  # the same row, one run
    assert got["metrics"] == ref["metrics"] and got["samples"] == ref["samples"]  # bit-identical
    assert got["selected_step"] == ref["selected_step"]
    steps = [(split, step) for split, step, _ in got["curve"]]
    assert len(steps) == len(set(steps))  # no duplicate curve points
    assert sorted(got["curve"]) == sorted(ref["curve"])


def test_sigterm_checkpoints_and_records_interrupted(world, capsys):
    db = world["tmp"] / "sigterm.db"
    rc = start_and_stop_at(world, db, "training@2", sig=signal.SIGTERM)
    assert rc == 143  # 128 + SIGTERM, as a shell reports it (Ctrl-C is 130)
    run = only_run(db)
    assert run.status == "interrupted" and "kdbench run --resume" in run.error
    assert (Path(run.state_path) / "state" / "state.json").is_file()
    assert json.loads((Path(run.state_path) / "state" / "state.json").read_text())["train"]["step"] == 2
    proc = resume(db, run.id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = distilled_run(db)
    assert got["metrics"] == world["reference"]["metrics"]
    assert not Path(run.state_path).exists()  # a finished run keeps no train state


def test_resume_refuses_what_cannot_be_resumed(world, capsys):
    db = world["tmp"] / "sigterm.db"  # its run finished above
    run = only_run(db)
    assert main(["run", "--resume", str(run.id), "--db", str(db)]) == 2
    assert "finished" in capsys.readouterr().err
    assert main(["run", "--resume", "999", "--db", str(db)]) == 2
    assert main(["run", "--resume", str(run.id), "--objective", "kl", "--db", str(db)]) == 2
    assert main(["run", "--resume", str(run.id), "--keep-activations", "--db", str(db)]) == 2
    assert "takes only --db and --no-progress" in capsys.readouterr().err  # the run keeps its own setting


def test_resume_after_an_intermediate_best_was_kept(world):
    """8 steps with validation every epoch (here every 5 steps, then at the last): the first
    validation's weights are kept as the best so far (a file beside the train state, hard-linked
    into the checkpoint); the run is killed two steps later and resumed into its own directory —
    the best file is adopted, not copied onto itself — and gives the uninterrupted result."""
    args = list(world["args"])
    args[args.index("--steps") + 1] = "8"
    straight = world["tmp"] / "best-straight.db"
    proc = subprocess.run([sys.executable, "-m", "kdbench", *args, "--db", str(straight)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = distilled_run(straight)
    first, last = sorted(step for split, step, _ in ref["curve"] if split == "valid")
    assert first < last == 8
    db = world["tmp"] / "best-killed.db"
    killed_world = {**world, "args": args}
    assert start_and_stop_at(killed_world, db, f"training@{first + 2}") == -signal.SIGKILL
    killed = only_run(db)
    kept = list(Path(killed.state_path).rglob("best.safetensors"))
    assert kept, "no best weights were kept before the kill"
    proc = resume(db, killed.id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = distilled_run(db)
    assert got["status"] == "finished" and got["id"] == killed.id
    assert got["metrics"] == ref["metrics"] and got["samples"] == ref["samples"]  # bit-identical
    assert got["selected_step"] == ref["selected_step"]
    steps = [(split, step) for split, step, _ in got["curve"]]
    assert len(steps) == len(set(steps)) and sorted(got["curve"]) == sorted(ref["curve"])


# ---------------------------------------------------------------------------- one owner per run

RACE_TRIALS = int(os.environ.get("KDBENCH_RACE_TRIALS", "3"))  # 10 for the hardening issue's measurement


@pytest.fixture(scope="module")
def killed_base(world):
    """One run killed (SIGKILL) at step 2 with its train state: each race trial starts from a copy."""
    import sqlite3

    db = world["tmp"] / "race-base.db"
    assert start_and_stop_at(world, db, "training@2") == -signal.SIGKILL
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the killed writer's log into the file: copies are whole
    con.close()
    return db, only_run(db)


def _copy_of_killed(killed_base, name: str) -> tuple[Path, int]:
    """The killed run's store and train state copied, as a fresh interrupted run of its own."""
    import shutil
    import sqlite3

    from kdbench.recipe import state_dir
    from kdbench.store import open_engine

    base, run = killed_base
    db = base.with_name(name)
    shutil.copy(base, db)
    engine = open_engine(str(db), readonly=True)
    target = state_dir(engine.url, run.id)
    engine.dispose()
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run.state_path, target)
    con = sqlite3.connect(db)
    con.execute("UPDATE runs SET state_path = ? WHERE id = ?", (str(target), run.id))
    con.commit()
    con.close()
    return db, run.id


def test_two_resumes_started_together_one_proceeds(world, killed_base):
    """The hardening issue's race: two `kdbench run --resume ID` started together. Exactly one
    proceeds; the other exits 2 within 5 s with one line and writes nothing; the finished row
    equals the uninterrupted run's and carries no error (before: one died renaming the train
    state, the other finished with the loser's error text in the row)."""
    argv = [sys.executable, "-m", "kdbench", "run", "--resume"]
    for trial in range(RACE_TRIALS):
        db, run_id = _copy_of_killed(killed_base, f"race-{trial}.db")
        procs = []
        for _ in range(2):
            t0 = time.monotonic()
            procs.append((subprocess.Popen([*argv, str(run_id), "--db", str(db), "--no-progress"], env=ENV,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), t0))
        ended = [None, None]  # (exit code, seconds from its start to its exit, stderr), timed apart

        def wait(i):
            proc, t0 = procs[i]
            err = proc.communicate(timeout=300)[1]
            ended[i] = (proc.returncode, time.monotonic() - t0, err)

        import threading

        waiters = [threading.Thread(target=wait, args=(i,)) for i in range(2)]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
        codes = sorted(rc for rc, _, _ in ended)
        assert codes == [0, 2], f"trial {trial}: exit codes {codes}: {[e[2][-600:] for e in ended]}"
        (_, waited, err), = [e for e in ended if e[0] == 2]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("kdbench: error: run ") and "is running" in lines[0], err
        assert waited < 5.0, f"trial {trial}: the refused resume took {waited:.1f} s"
        got = distilled_run(db)
        ref = world["reference"]
        assert got["status"] == "finished" and got["id"] == run_id
        assert got["metrics"] == ref["metrics"] and got["samples"] == ref["samples"]
        assert sorted(got["curve"]) == sorted(ref["curve"])
        assert only_run(db).error is None


def test_a_resume_of_a_live_run_is_refused_and_touches_nothing(world, killed_base, capsys):
    """A run whose owner is alive (here: this test process claims it) cannot be resumed by
    anyone else; the refusal changes no byte of the store."""
    import hashlib

    from kdbench.lifecycle import claim_run, this_host
    from kdbench.store import open_engine

    db, run_id = _copy_of_killed(killed_base, "live.db")
    engine = open_engine(str(db))
    claim_run(engine, run_id, host=this_host(), pid=os.getpid())
    engine.dispose()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    proc = subprocess.run([*[sys.executable, "-m", "kdbench", "run", "--resume"], str(run_id), "--db", str(db)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"process {os.getpid()}" in proc.stderr, proc.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_process_that_lost_its_run_writes_nothing(world, killed_base):
    """Fencing: once another process owns the run, every write of the old owner (row, curve,
    results, heartbeat) is refused and leaves the row as the new owner has it."""
    from kdbench.lifecycle import Heartbeat, claim_run, this_host
    from kdbench.store import OwnershipLost, RunWriter, get_run, open_engine

    db, run_id = _copy_of_killed(killed_base, "fenced.db")
    engine = open_engine(str(db))
    old = (this_host(), 111_111_111)  # a PID no process has: the claim below may take its run over
    claim_run(engine, run_id, host=old[0], pid=old[1], stale_after_s=1e9)
    writer, beat = RunWriter(engine, run_id, old), Heartbeat(engine, run_id, host=old[0], pid=old[1], owned=True)
    writer.curve(99, 1.0)  # still the owner: written
    claim_run(engine, run_id)  # the old owner's PID is gone: this process takes the run over
    for write in (lambda: writer.curve(100, 1.0), lambda: writer.fail("x"), lambda: writer.finish(),
                  lambda: writer.results([("t", "m", 1.0, 0)], []), writer.check_owner):
        with pytest.raises(OwnershipLost, match="now owned by process"):
            write()
    beat.beat()
    assert beat.lost
    row = get_run(engine, run_id)
    assert (row.status, row.pid, row.error) == ("running", os.getpid(), None)
    engine.dispose()


def test_a_resume_stopped_before_training_gives_the_run_back(world, killed_base, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) while a resume loads its models: the run is as it was — recorded
    interrupted, owner and error unchanged — and another resume can take it."""
    import kdbench.recipe
    from kdbench.store import get_run, open_engine

    db, run_id = _copy_of_killed(killed_base, "released.db")
    engine = open_engine(str(db), readonly=True)
    before = get_run(engine, run_id)
    engine.dispose()

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdbench.recipe.DistillRun, "setup", stopped)
    assert main(["run", "--resume", str(run_id), "--db", str(db), "--no-progress"]) == 130
    engine = open_engine(str(db), readonly=True)
    after = get_run(engine, run_id)
    engine.dispose()
    fields = ("status", "error", "host", "pid", "heartbeat_at", "finished_at")
    assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
    from kdbench.lifecycle import claim_run

    engine = open_engine(str(db))
    claim_run(engine, run_id)  # nothing was left claimed: another resume can take the run
    engine.dispose()
