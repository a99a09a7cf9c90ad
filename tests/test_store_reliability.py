"""The run store under stress and over time: concurrent writers and first openers, every SQLite
URL spelling, read-only engines, schema migration with backup, refusal of newer / foreign /
damaged stores, heartbeats and effective status of dead runs, and ``kdbench gc``.

Writer processes import only ``kdbench.store`` (no torch), one thread each."""

from __future__ import annotations

import os
import re
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
from kdbench.store import SCHEMA_VERSION, Metric, Sample, StoreError, get_run, open_engine

try:
    from tests.store_helpers import (ENV, ROOT, checkpoint, cli, count, digest, new_store, one_error_line, start_run,
                                     store_location)
except ImportError:  # tests/ itself on sys.path
    from store_helpers import (ENV, ROOT, checkpoint, cli, count, digest, new_store, one_error_line, start_run,
                               store_location)

SCHEMA_1_DUMP = ROOT / "tests" / "data" / "runs-schema1.sql"  # the runs.db kdbench v1 committed (micro v1 rows)


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


@pytest.fixture
def server_store(tmp_path) -> str:
    """A new, empty database on the PostgreSQL server of ``KDBENCH_TEST_STORE_URL`` (.ci/run starts
    one: scripts/postgres.sh), dropped when the tests end."""
    if not os.environ.get("KDBENCH_TEST_STORE_URL"):
        pytest.skip("no PostgreSQL server (KDBENCH_TEST_STORE_URL; .ci/run starts one); the SQLite case runs")
    return store_location(tmp_path)


def server_count(url: str, sql: str):
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text(sql))]
    finally:
        engine.dispose()


def test_8_writers_x_300_runs_on_a_new_postgresql_store(tmp_path, server_store):
    """The team store: eight processes that each open a new PostgreSQL database (the first opens
    race to create the schema) and write 300 runs; no row is lost or doubled."""
    t0 = time.perf_counter()
    spawn_writers(tmp_path, [server_store] * 8, 300)
    print(f"\n8 writers x 300 runs on a new PostgreSQL store: {time.perf_counter() - t0:.1f} s wall")
    assert server_count(server_store, "SELECT count(*), count(DISTINCT seed) FROM runs") == [(2400, 2400)]
    assert server_count(server_store, "SELECT status, count(*) FROM runs GROUP BY status") == [("finished", 2400)]
    assert server_count(server_store, "SELECT count(*) FROM metrics") == [(7200,)]
    assert server_count(server_store, "SELECT value FROM kdbench_meta WHERE key = 'schema_version'") == \
        [(str(SCHEMA_VERSION),)]


def test_8_simultaneous_first_openers_of_a_new_postgresql_store(tmp_path, server_store):
    spawn_writers(tmp_path, [server_store] * 8, 1, start_at=time.time() + 1.5)
    assert server_count(server_store, "SELECT count(*) FROM runs") == [(8,)]
    assert server_count(server_store, "SELECT count(*) FROM kdbench_meta") == [(1,)]


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


# ---------------------------------------------------------------------------- servers that never answer, folders that cannot be written


def test_a_server_that_never_answers_is_one_line_after_the_connect_timeout(tmp_path):
    """A host that accepts the TCP connection and then says nothing (a firewall, a wedged
    server) used to hang every command; now the driver gives up after $KDBENCH_DB_CONNECT_TIMEOUT
    seconds and the command says so in one line, exit 2, without the URL's password."""
    import socket

    pytest.importorskip("psycopg")  # a test extra (pyproject.toml): installed by scripts/setup.sh
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
    port = silent.getsockname()[1]
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "kdbench", "show", "1", "--db",
                               f"postgresql+psycopg://ana:Hush-9@127.0.0.1:{port}/kd"],
                              env={**ENV, "KDBENCH_DB_CONNECT_TIMEOUT": "2"}, capture_output=True, text=True,
                              timeout=60)
        took = time.monotonic() - t0
    finally:
        silent.close()
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "run store" in line and "timeout" in line.lower(), proc.stderr
    assert "Hush-9" not in proc.stderr and took < 20, took


def _without_write_permission(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` as a user that cannot write where permission bits forbid it: as root (which
    ignores them) the process drops CAP_DAC_OVERRIDE through util-linux's setpriv."""
    import os
    import shutil

    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "util-linux's setpriv is needed to test permissions as root"
        cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
               "-dac_override,-dac_read_search", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_a_store_in_a_read_only_folder_can_be_read(tmp_path):
    """SQLite's WAL mode needs its -shm side file even to read; in a folder the reader cannot
    write (a shared results folder, a read-only mount) every read failed with "attempt to write a
    readonly database". Now such a store opens as an immutable snapshot when no write-ahead log
    is pending, and the folder is never written."""
    folder = tmp_path / "shared"
    folder.mkdir()
    db = new_store(folder / "runs.db")
    checkpoint(db)
    folder.chmod(0o555)
    try:
        before = sorted(p.name for p in folder.iterdir())
        proc = _without_write_permission([sys.executable, "-m", "kdbench", "show", "1", "--db", str(db)], env=ENV)
        assert proc.returncode == 0 and "status: finished" in proc.stdout, proc.stderr
        gc = _without_write_permission([sys.executable, "-m", "kdbench", "gc", "--db", str(db)], env=ENV)
        assert gc.returncode == 0, gc.stderr
        assert sorted(p.name for p in folder.iterdir()) == before == ["runs.db"]
        write = _without_write_permission([sys.executable, "-c", "from kdbench.store import open_engine; "
                                           f"open_engine({str(db)!r})"], env=ENV)
        assert write.returncode == 1 and "is not writable" in write.stderr  # a writer is refused before it writes
    finally:
        folder.chmod(0o755)
