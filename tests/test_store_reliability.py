"""The run store under stress and over time: concurrent writers and first openers, every SQLite
URL spelling, read-only engines, schema migration with backup, refusal of newer / foreign /
damaged stores, heartbeats and effective status of dead runs, and ``kdbench gc``.

Writer processes import only ``kdbench.store`` (no torch), one thread each."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from kdbench import store as S
from kdbench.cli import main
from kdbench.lifecycle import (
    DEFAULT_STALE_AFTER_S,
    Heartbeat,
    effective_status,
    find_orphans,
    liveness,
    pid_alive,
    this_host,
)
from kdbench.store import (
    SCHEMA_VERSION,
    Artifact,
    CurvePoint,
    Metric,
    Run,
    RunWriter,
    Sample,
    StoreError,
    get_run,
    open_engine,
    utcnow,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_1_DUMP = ROOT / "tests" / "data" / "runs-schema1.sql"  # the runs.db kdbench v1 committed (micro v1 rows)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "MKL_NUM_THREADS": "1"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_run(engine, **kw):
    return RunWriter.start(engine, role="distilled", suite="micro", suite_version="1", seed=kw.pop("seed", 0),
                           config={}, provenance={}, objective="kl", params={}, setting="kl", **kw)


def new_store(path: Path, n_runs: int = 1) -> Path:
    engine = open_engine(str(path))
    for i in range(n_runs):
        w = start_run(engine, seed=i)
        w.metrics([("chatterbot", "rougeL", 10.0 + i, 10)])
        w.finish()
    engine.dispose()
    checkpoint(path)
    return path


def checkpoint(path: Path) -> None:
    """Fold the -wal into the file so byte comparisons see every row."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def count(path: Path, sql: str):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def cli(capsys, *args, stdin: str | None = None, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdbench: error:") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------- concurrency

WRITER = r"""
import sys
from kdbench.store import RunWriter, open_engine
url, wid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 4:                      # first openers: start together
    import time
    while time.time() < float(sys.argv[4]):
        time.sleep(0.001)
engine = open_engine(url)
for i in range(n):
    w = RunWriter.start(engine, role="distilled", suite="micro", suite_version="1", seed=wid * 100_000 + i,
                        config={"writer": wid}, provenance={}, objective="kl", setting="kl")
    w.metrics([("t", "rougeL", float(i), 10), ("t", "rougeL", float(i) + 1, 20), ("t", "mean_length", 3.0, None)])
    w.finish(wall_time_s=0.0)
engine.dispose()
assert "torch" not in sys.modules
"""


def spawn_writers(tmp_path, urls, n_runs, start_at=None):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    extra = [] if start_at is None else [repr(start_at)]
    procs = [subprocess.Popen([sys.executable, str(script), url, str(i), str(n_runs), *extra], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, url in enumerate(urls)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0 and "Traceback" not in err, err
    return results


def test_8_writers_x_300_runs_on_a_new_store(tmp_path):
    db = tmp_path / "runs.db"
    t0 = time.perf_counter()
    spawn_writers(tmp_path, [str(db)] * 8, 300)
    wall = time.perf_counter() - t0
    print(f"\n8 writers x 300 runs (start + 3 metrics + finish) on a new store: {wall:.1f} s wall")
    assert count(db, "SELECT count(*), count(DISTINCT seed) FROM runs") == [(2400, 2400)]
    assert count(db, "SELECT status, count(*) FROM runs GROUP BY status") == [("finished", 2400)]
    assert count(db, "SELECT count(*) FROM metrics") == [(7200,)]
    assert count(db, "SELECT count(*) FROM metrics m LEFT JOIN runs r ON r.id = m.run_id WHERE r.id IS NULL") == [(0,)]
    assert count(db, "SELECT value FROM kdbench_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_8_simultaneous_first_openers_of_every_spelling(tmp_path):
    db = tmp_path / "fresh.db"
    spellings = [str(db), f"sqlite:///{db}", f"sqlite+pysqlite:///{db}", f"sqlite:///{db}?timeout=30"] * 2
    spawn_writers(tmp_path, spellings, 1, start_at=time.time() + 1.5)
    assert count(db, "SELECT count(*) FROM runs") == [(8,)]
    assert count(db, "SELECT count(*) FROM kdbench_meta") == [(1,)]


@pytest.mark.parametrize("spelling", ["{p}", "sqlite:///{p}", "sqlite+pysqlite:///{p}", "sqlite:///{p}?timeout=20",
                                      "sqlite+pysqlite:///{p}?timeout=20&check_same_thread=false"])
def test_pragmas_for_every_sqlite_spelling(tmp_path, spelling):
    db = tmp_path / "p.db"
    engine = open_engine(spelling.format(p=db))
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    with pytest.raises(IntegrityError):  # foreign keys are enforced
        with Session(engine) as s, s.begin():
            s.add(Metric(run_id=12345, task="t", metric="m", value=1.0))
    engine.dispose()
    ro = open_engine(spelling.format(p=db), readonly=True)
    with ro.connect() as c:
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert c.exec_driver_sql("PRAGMA query_only").scalar() == 1
    ro.dispose()


@pytest.mark.parametrize("spelling", ["sqlite:///{p}", "sqlite+pysqlite:///{p}", "sqlite+pysqlite:///{p}?timeout=5",
                                      "{p}"])
def test_readonly_engine_refuses_every_write(tmp_path, spelling):
    db = new_store(tmp_path / "ro.db")
    before = digest(db)
    ro = open_engine(spelling.format(p=db), readonly=True)
    for sql in ("UPDATE runs SET status = 'hacked'", "DELETE FROM metrics",
                "INSERT INTO kdbench_meta (key, value) VALUES ('x', 'y')", "CREATE TABLE evil (a)"):
        with pytest.raises(OperationalError, match="readonly|read-only|query_only|attempt to write"):
            with ro.begin() as c:
                c.execute(text(sql))
    with pytest.raises(OperationalError):
        start_run(ro)
    assert get_run(ro, 1).status == "finished"
    ro.dispose()
    assert digest(db) == before


@pytest.mark.parametrize("spelling", ["{p}", "sqlite:///{p}", "sqlite+pysqlite:///{p}", "sqlite:///{p}?timeout=5"])
def test_readonly_open_never_creates_a_file_or_a_table(tmp_path, spelling):
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="no run store at"):
        open_engine(spelling.format(p=missing), readonly=True)
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    ro = open_engine(spelling.format(p=empty), readonly=True)
    assert not S.has_schema(ro)
    with pytest.raises(StoreError, match="empty"):
        S.require_schema(ro)
    ro.dispose()
    assert empty.stat().st_size == 0


def test_readonly_other_databases_use_readonly_transactions():
    """Non-SQLite engines: PostgreSQL gets its driver option; the rest SET TRANSACTION READ ONLY
    first thing in every transaction (shown here on a SQLite engine, which rejects that SQL)."""
    from sqlalchemy import create_engine

    engine = S.engines._readonly_other(create_engine("sqlite://"))
    with pytest.raises(OperationalError, match="TRANSACTION"):
        with engine.begin() as c:
            c.execute(text("SELECT 1"))


def test_a_busy_store_is_retried_with_backoff(tmp_path, monkeypatch):
    db = new_store(tmp_path / "busy.db")
    monkeypatch.setattr(S, "BUSY_TIMEOUT_MS", 20)  # SQLite gives up fast: the retry loop must absorb it
    engine = open_engine(str(db))
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.6, lambda: holder.execute("COMMIT"))
    t0 = time.perf_counter()
    release.start()
    try:
        w = start_run(engine)
        w.results([("t", "rougeL", 1.0, 10)], [])
        w.finish()
    finally:
        release.join()
        holder.close()
    assert time.perf_counter() - t0 >= 0.5
    assert get_run(engine, w.run_id).status == "finished"
    engine.dispose()


def test_results_are_one_transaction(tmp_path):
    engine = open_engine(str(tmp_path / "tx.db"))
    w = start_run(engine)
    good = {"task": "t", "prompt_id": 1, "seed": 10, "prompt": "p", "output": "o", "reference": ["r"],
            "scores": {"rougeL": 1.0}}
    with pytest.raises(IntegrityError):  # the second sample violates NOT NULL at flush: nothing stays
        w.results([("t", "rougeL", 1.0, 10), ("t", "rougeL", 2.0, 20)], [good, {**good, "prompt": None}])
    with Session(engine) as s:
        assert s.scalar(select(func.count(Metric.id))) == 0 and s.scalar(select(func.count(Sample.id))) == 0
    w.results([("t", "rougeL", 1.0, 10)], [good, {**good, "seed": 20}])
    w.metrics([("t", "extra", 3.0, None)])  # the old calls still work
    w.samples([{**good, "seed": 30}])
    with Session(engine) as s:
        assert s.scalar(select(func.count(Metric.id))) == 2 and s.scalar(select(func.count(Sample.id))) == 3
    w.interrupt("SIGTERM")
    run = get_run(engine, w.run_id)
    assert run.status == "interrupted" and run.error == "SIGTERM" and run.finished_at is not None
    with pytest.raises(TypeError, match="unknown run column"):
        w.update(no_such_column=1)
    engine.dispose()


# ---------------------------------------------------------------------------- schema evolution


def committed_copy(tmp_path) -> Path:
    db = tmp_path / "runs.db"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA_1_DUMP.read_text())
    con.close()
    assert count(db, "SELECT value FROM kdbench_meta") == [("1",)], "the committed store is expected at schema 1"
    return db


def test_migration_from_the_real_schema_1_store(tmp_path, capsys):
    db = committed_copy(tmp_path)
    old_runs = count(db, "SELECT id, role, setting, status, suite_version, config FROM runs ORDER BY id")
    old_counts = [count(db, f"SELECT count(*) FROM {t}") for t in ("runs", "metrics", "curves", "samples", "artifacts")]
    before = digest(db)

    # read-only opens read it as is and never migrate
    ro = open_engine(str(db), readonly=True)
    run = get_run(ro, old_runs[0][0])
    assert run.status == old_runs[0][3] and run.config_hash is None and run.heartbeat_at is None
    ro.dispose()
    rc, out, err = cli(capsys, "show", old_runs[0][0], "--db", db)
    assert rc == 0 and f"run {old_runs[0][0]}:" in out, err
    assert digest(db) == before and not list(tmp_path.glob("runs.db.bak-*"))

    engine = open_engine(str(db))
    backups = list(tmp_path.glob("runs.db.bak-schema1-*"))
    assert len(backups) == 1 and re.fullmatch(r"runs\.db\.bak-schema1-\d{8}T\d{6}Z", backups[0].name)
    assert "migrated run store" in capsys.readouterr().err
    # the backup is the old store, whole
    assert count(backups[0], "SELECT value FROM kdbench_meta") == [("1",)]
    assert count(backups[0], "SELECT id, role, setting, status, suite_version, config FROM runs ORDER BY id") == old_runs
    # the store is schema 2 with every old row intact
    assert count(db, "SELECT value FROM kdbench_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert count(db, "SELECT id, role, setting, status, suite_version, config FROM runs ORDER BY id") == old_runs
    assert [count(db, f"SELECT count(*) FROM {t}") for t in ("runs", "metrics", "curves", "samples", "artifacts")] \
        == old_counts
    cols = {r[1] for r in count(db, "PRAGMA table_info(runs)")}
    assert {"config_hash", "sweep_id", "host", "pid", "heartbeat_at", "state_path"} <= cols
    indexes = {r[0] for r in count(db, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"ix_runs_config_hash", "ix_runs_sweep_id"} <= indexes
    w = start_run(engine, config_hash="abc", sweep_id="s1")  # and it takes new rows
    w.finish()
    engine.dispose()
    open_engine(str(db)).dispose()  # a second open: nothing to migrate, no second backup
    assert len(list(tmp_path.glob("runs.db.bak-*"))) == 1


def test_concurrent_openers_migrate_once(tmp_path):
    db = committed_copy(tmp_path)
    n_old = count(db, "SELECT count(*) FROM runs")[0][0]
    results = spawn_writers(tmp_path, [str(db)] * 4, 2, start_at=time.time() + 1.5)
    assert len(list(tmp_path.glob("runs.db.bak-*"))) == 1
    assert sum("migrated run store" in err for _, _, err in results) == 1
    assert count(db, "SELECT count(*) FROM runs") == [(n_old + 8,)]


def make_newer(tmp_path) -> Path:
    db = new_store(tmp_path / "newer.db")
    con = sqlite3.connect(db)
    con.execute("UPDATE kdbench_meta SET value = '999' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    checkpoint(db)
    return db


@pytest.mark.parametrize("args", [["show", "1"], ["run", "--objective", "csd", "--no-progress"],
                                  ["eval", "1", "--lm-eval", "kdbench_multi30k_mc"], ["gc"], ["gc", "--mark"]])
def test_a_newer_store_is_refused_by_every_command(tmp_path, capsys, args):
    db = make_newer(tmp_path)
    before = digest(db)
    rc, out, err = cli(capsys, *args, "--db", db)
    line = one_error_line(err)
    assert rc == 2 and line == (f"kdbench: error: run store {db} has schema 999; this kdbench reads schema "
                                f"{SCHEMA_VERSION} — upgrade kdbench")
    assert digest(db) == before


def test_a_newer_store_is_refused_in_a_real_process(tmp_path):
    db = make_newer(tmp_path)
    res = subprocess.run([sys.executable, "-m", "kdbench", "show", "1", "--db", str(db)], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "has schema 999; this kdbench reads schema 2 — upgrade kdbench" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def foreign_stores(tmp_path) -> dict[str, Path]:
    out = {}
    for name, ddl in {
        "other_app": ["CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO users VALUES (1, 'a')"],
        "runs_only": ["CREATE TABLE runs (id INTEGER PRIMARY KEY, status TEXT)", "INSERT INTO runs VALUES (1, 'x')"],
        "no_version": ["CREATE TABLE runs (id INTEGER PRIMARY KEY)", "CREATE TABLE kdbench_meta (key TEXT, value TEXT)"],
    }.items():
        path = tmp_path / f"{name}.db"
        con = sqlite3.connect(path)
        for sql in ddl:
            con.execute(sql)
        con.commit()
        con.close()
        out[name] = path
    return out


@pytest.mark.parametrize("kind", ["other_app", "runs_only", "no_version"])
@pytest.mark.parametrize("args", [["show", "1"], ["run", "--objective", "kl"], ["gc", "--delete", "--yes"]])
def test_a_foreign_store_is_refused_and_never_stamped(tmp_path, capsys, kind, args):
    db = foreign_stores(tmp_path)[kind]
    before = digest(db)
    rc, _, err = cli(capsys, *args, "--db", db)
    assert rc == 2 and "is not a kdbench run store" in one_error_line(err)
    assert digest(db) == before and not Path(f"{db}-wal").exists()
    with pytest.raises(StoreError, match="not a kdbench run store"):
        open_engine(str(db))
    assert digest(db) == before


def test_a_store_missing_a_column_is_one_clear_line(tmp_path, capsys):
    db = new_store(tmp_path / "damaged.db")
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE runs DROP COLUMN heartbeat_at")
    con.commit()
    con.close()
    for args in (["show", "1"], ["run", "--objective", "kl"], ["gc"]):
        rc, _, err = cli(capsys, *args, "--db", db)
        line = one_error_line(err)
        assert rc == 2 and "damaged: table runs has no column(s) heartbeat_at" in line and "no such column" not in line


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
    """A tiny real run setup: random 2-layer teacher / 1-layer student, 8 GSM8K-style problems."""
    import dataclasses
    import json

    from kdbench import suites

    try:
        from tests.tiny_models import make_tiny_pair
    except ImportError:
        from tiny_models import make_tiny_pair
    tmp = tmp_path_factory.mktemp("tinyrun")
    teacher, student = make_tiny_pair(tmp / "models")
    data = tmp / "data" / "gsm8k"
    data.mkdir(parents=True)
    for name, n in (("train", 24), ("test", 2)):  # 24: more than a batch of 8 after validation is split off
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(n)))
    spec = suites.PAPER_TASK_GSM8K
    cut = dict(max_prompt_tokens=32, max_tokens=40)
    small = dataclasses.replace(spec, train=dataclasses.replace(spec.train, **cut),
                                eval=dataclasses.replace(spec.eval, seeds=(10,), max_new_tokens=4, n_valid=1),
                                tasks=tuple(dataclasses.replace(t, max_new_tokens=4) for t in spec.tasks))
    args = ["run", "--objective", "kl", "--suite", spec.name, "--teacher", str(teacher), "--teacher-finetuned",
            "--student", str(student), "--data-dir", str(tmp / "data"), "--steps", "1", "--eval-limit", "1",
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
        monkeypatch.setattr(sys.modules[module], attr, value)
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

    rc, run = _tiny_run(tiny_gsm8k, monkeypatch, capsys, **{"kdbench.runner.train": stop})
    assert rc == 130 and run.status == "interrupted"
