"""The run store over a run's life: the effective status of dead runs (pid, heartbeat), heartbeats that
beat and stop, ``kdbench gc``, and the runner's side (process and heartbeat recorded, Ctrl-C recorded as
interrupted). Split from test_store_reliability.py; writer processes import only ``kdbench.store``."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kdbench.cli import main
from kdbench.lifecycle import (DEFAULT_STALE_AFTER_S, Heartbeat, effective_status, find_orphans, liveness, pid_alive,
                               this_host)
from kdbench.store import Artifact, CurvePoint, Metric, Run, Sample, get_run, open_engine, utcnow

try:
    from tests.store_helpers import ENV, cli, new_store, one_error_line, start_run
except ImportError:  # tests/ itself on sys.path
    from store_helpers import ENV, cli, new_store, one_error_line, start_run


# ---------------------------------------------------------------------------- lifecycle


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


NOW = dt.datetime(2026, 1, 2, 12, 0, 0)


@pytest.mark.parametrize("row, expected", [
    ({"status": "finished", "host": "h", "pid": 1}, "finished"),
    ({"status": "failed"}, "failed"),
    ({"status": "interrupted"}, "interrupted"),
    ({"status": "running", "host": "me", "pid": 100, "heartbeat_at": NOW}, "running"),            # alive
    ({"status": "running", "host": "me", "pid": 200, "heartbeat_at": NOW}, "interrupted"),        # dead PID
    ({"status": "running", "host": "me", "pid": 100,
      "heartbeat_at": NOW - dt.timedelta(hours=1)}, "interrupted"),                               # PID reused / hung
    ({"status": "running", "host": "me", "pid": 100, "heartbeat_at": None}, "running"),          # no beat yet
    ({"status": "running", "host": "other", "pid": 200, "heartbeat_at": NOW - dt.timedelta(seconds=60)}, "running"),
    ({"status": "running", "host": "other", "pid": 100,
      "heartbeat_at": NOW - dt.timedelta(seconds=DEFAULT_STALE_AFTER_S + 1)}, "interrupted"),
    ({"status": "running", "created_at": NOW - dt.timedelta(minutes=1)}, "running"),              # legacy row
    ({"status": "running", "created_at": NOW - dt.timedelta(days=2)}, "interrupted"),
    ({"status": "running", "host": "other", "created_at": NOW - dt.timedelta(days=2),
      "heartbeat_at": "2026-01-02T11:59:30"}, "running"),                                          # ISO strings too
    ({"status": "running", "host": "other",
      "heartbeat_at": dt.datetime(2026, 1, 2, 13, 59, tzinfo=dt.timezone(dt.timedelta(hours=2)))}, "running"),
])
def test_effective_status_is_a_pure_function(row, expected):
    alive = {100}.__contains__
    assert effective_status(row, NOW, pid_alive=alive, host="me") == expected
    obj = type("Row", (), dict(row))()  # attribute access works the same
    assert effective_status(obj, NOW, pid_alive=alive, host="me") == expected


def test_pid_alive():
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid())
    assert not pid_alive(None) and not pid_alive(-5) and not pid_alive(0) and not pid_alive(2**70)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # exited but not reaped: a zombie is not alive
        if Path(f"/proc/{zombie.pid}/stat").exists() and " Z " in Path(f"/proc/{zombie.pid}/stat").read_text():
            break
        time.sleep(0.01)
    assert not pid_alive(zombie.pid)
    zombie.wait()


def test_heartbeat_beats_and_stops_cleanly(tmp_path):
    engine = open_engine(str(tmp_path / "hb.db"))
    w = start_run(engine)
    hb = Heartbeat(engine, w.run_id, interval_s=0.05)
    with hb:
        first = get_run(engine, w.run_id)
        assert (first.host, first.pid) == (this_host(), os.getpid()) and first.heartbeat_at is not None
        assert effective_status(first) == "running"
        deadline = time.time() + 10
        while hb.beats < 4 and time.time() < deadline:
            time.sleep(0.02)
        assert hb.alive
    assert not hb.alive and hb.beats >= 4 and hb.failures == 0
    last = get_run(engine, w.run_id).heartbeat_at
    assert last > first.heartbeat_at
    time.sleep(0.2)
    assert get_run(engine, w.run_id).heartbeat_at == last  # stopped means stopped
    assert not any(t.name.startswith("kdbench-heartbeat") for t in threading.enumerate())
    engine.dispose()


def test_a_row_with_a_dead_pid_shows_interrupted(tmp_path, capsys):
    db = new_store(tmp_path / "dead.db")
    engine = open_engine(str(db))
    w = start_run(engine, host=this_host(), pid=dead_pid(), heartbeat_at=utcnow())
    engine.dispose()
    rc, out, err = cli(capsys, "show", w.run_id, "--db", db)
    assert rc == 0, err
    assert re.search(r"^status: interrupted \(recorded running; process \d+ on .+ is gone\)$", out, re.M), out
    assert "status: running" not in out


CHILD = r"""
import sys, time
from kdbench.store import RunWriter, open_engine
from kdbench.lifecycle import Heartbeat
engine = open_engine(sys.argv[1])
w = RunWriter.start(engine, role="distilled", suite="micro", suite_version="1", seed=7, config={}, provenance={},
                    objective="kl", setting="kl")
w.metrics([("t", "rougeL", 1.0, 10)])
w.curve(1, 0.5)
w.samples([{"task": "t", "prompt_id": 1, "seed": 10, "prompt": "p", "output": "o", "reference": ["r"]}])
w.artifact("x", {"a": 1})
Heartbeat(engine, w.run_id, interval_s=0.2).start()
print(w.run_id, flush=True)
time.sleep(600)
"""


def test_sigkilled_child_with_a_heartbeat_is_interrupted_and_gc_cleans_it(tmp_path, capsys, monkeypatch):
    db = new_store(tmp_path / "gc.db", n_runs=2)  # runs 1, 2: finished, must survive everything
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(db)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        run_id = int(child.stdout.readline())
        ro = open_engine(str(db), readonly=True)
        run = get_run(ro, run_id)
        assert run.pid == child.pid and run.host == this_host()
        assert effective_status(run) == "running"
        rc, out, _ = cli(capsys, "gc", "--db", db)
        assert rc == 0 and "no interrupted runs" in out
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    run = get_run(ro, run_id)
    assert run.status == "running"  # the row cannot know...
    status, why = liveness(run)
    assert status == "interrupted" and "is gone" in why  # ...but its effective status does

    # a stale run of another machine and a fresh one: only the stale one is listed
    engine = open_engine(str(db))
    stale = start_run(engine, host="elsewhere", pid=1, heartbeat_at=utcnow() - dt.timedelta(hours=1)).run_id
    fresh = start_run(engine, host="elsewhere", pid=1, heartbeat_at=utcnow()).run_id
    engine.dispose()
    rc, out, _ = cli(capsys, "gc", "--db", db)
    assert rc == 0 and "2 running run(s) whose process is gone" in out
    listed = {int(m) for m in re.findall(r"^\s*(\d+)\s+running", out, re.M)}
    assert listed == {run_id, stale}

    rc, out, err = cli(capsys, "gc", "--mark", "--db", db)
    assert rc == 0 and f"marked 2 run(s) interrupted: {min(run_id, stale)}, {max(run_id, stale)}" in out, err
    after = get_run(ro, run_id)
    assert after.status == "interrupted" and "marked by kdbench gc" in after.error
    assert get_run(ro, fresh).status == "running"

    rc, out, err = cli(capsys, "gc", "--delete", "--db", db, monkeypatch=monkeypatch)  # no tty, no --yes
    assert rc == 2 and "add --yes" in one_error_line(err)
    assert get_run(ro, run_id) is not None

    rc, out, err = cli(capsys, "gc", "--delete", "--yes", "--db", db)
    assert rc == 0 and "deleted 2 run(s)" in out, err
    with Session(ro) as s:
        for model in (Metric, CurvePoint, Sample, Artifact):
            assert s.scalar(select(func.count()).select_from(model).where(model.run_id.in_([run_id, stale]))) == 0
        assert sorted(s.scalars(select(Run.id))) == [1, 2, fresh]
        assert s.scalar(select(func.count(Metric.id)).where(Metric.run_id.in_([1, 2]))) == 2
    assert find_orphans(ro) == []
    ro.dispose()


def test_gc_on_missing_or_empty_stores(tmp_path, capsys):
    rc, _, err = cli(capsys, "gc", "--db", tmp_path / "none.db")
    assert rc == 2 and "no run store" in one_error_line(err) and not (tmp_path / "none.db").exists()
    rc, _, err = cli(capsys, "gc", "--mark", "--delete", "--db", tmp_path / "none.db")
    assert rc == 2 and "not allowed with" in one_error_line(err)


# ---------------------------------------------------------------------------- the runner's side (ENGINE)


@pytest.fixture(scope="module")
def tiny_gsm8k(tmp_path_factory):
    """A tiny real run setup: random 2-layer teacher / 1-layer student, GSM8K-style problems."""
    try:
        from tests.tiny_models import make_tiny_gsm8k, tiny_gsm8k_suite
    except ImportError:
        from tiny_models import make_tiny_gsm8k, tiny_gsm8k_suite
    tmp = tmp_path_factory.mktemp("tinyrun")
    teacher, student, data_root = make_tiny_gsm8k(tmp)
    small = tiny_gsm8k_suite()
    args = ["run", "--objective", "kl", "--suite", small.name, "--teacher", str(teacher), "--teacher-finetuned",
            "--student", str(student), "--data-dir", str(data_root), "--steps", "1", "--eval-limit", "1",
            "--no-save", "--no-progress", "--db", str(tmp / "runs.db")]
    return {"spec": small, "args": args, "db": tmp / "runs.db"}


def _tiny_run(tiny_gsm8k, monkeypatch, capsys, **patches):
    import torch

    from kdbench import suites

    monkeypatch.setitem(suites.SUITES, tiny_gsm8k["spec"].name, tiny_gsm8k["spec"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    for target, value in patches.items():
        module, attr = target.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(module), attr, value)
    rc = main(tiny_gsm8k["args"])
    capsys.readouterr()
    engine = open_engine(str(tiny_gsm8k["db"]), readonly=True)
    with Session(engine) as s:
        run = s.scalars(select(Run).where(Run.role == "distilled").order_by(Run.id.desc())).first()
        s.expunge_all()
    engine.dispose()
    return rc, run


def test_a_run_records_its_process_and_heartbeat(tiny_gsm8k, monkeypatch, capsys):
    rc, run = _tiny_run(tiny_gsm8k, monkeypatch, capsys)
    assert rc == 0 and run.status == "finished"
    assert (run.host, run.pid) == (this_host(), os.getpid()) and run.heartbeat_at is not None


def test_ctrl_c_records_interrupted(tiny_gsm8k, monkeypatch, capsys):
    def stop(*a, **k):
        raise KeyboardInterrupt

    rc, run = _tiny_run(tiny_gsm8k, monkeypatch, capsys, **{"kdbench.recipe.train": stop})
    assert rc == 130 and run.status == "interrupted"
