"""How the store is opened: the SQLite file checks, engines (read-only for every URL), and
:func:`open_engine`, which checks the schema before anything is written. Where it is (URLs and
paths): kdbench/store/location.py."""

from __future__ import annotations

import os
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from kdbench.store.location import Location, first_line, locate
from kdbench.store.models import BUSY_TIMEOUT_MS, IMMEDIATE_OPTION, SCHEMA_VERSION, StoreError
from kdbench.store.schema import damaged_store, prepare_schema, read_schema_state
from kdbench.store.transactions import retry_busy


_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_sqlite_file(path: Path, *, must_exist: bool) -> str:
    """What is at ``path``, without opening it with SQLite: "missing", "empty" or "ok".

    Raises :class:`StoreError` for a directory, a file that is not a SQLite database (wrong
    header, shorter than one page) or a truncated one (shorter than its header says)."""
    if not path.exists():
        if path.is_symlink():
            raise StoreError(f"run store {path} is a dangling symbolic link")
        if must_exist:
            raise StoreError(f"no run store at {path} (run `kdbench run` first or pass --db)")
        return "missing"
    if path.is_dir():
        raise StoreError(f"run store {path} is a directory, not a database file")
    if not path.is_file():
        raise StoreError(f"run store {path} is not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header = fh.read(100)
    except OSError as exc:
        raise StoreError(f"cannot read run store {path}: {exc.strerror or exc}") from None
    if size == 0:
        return "empty"
    if len(header) < 100 or header[:16] != _SQLITE_MAGIC:
        raise StoreError(f"run store {path} is not a SQLite database (file is not a database)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise StoreError(f"run store {path} is not a SQLite database (bad page size {page_size})")
    n_pages = int.from_bytes(header[28:32], "big")
    valid_for = int.from_bytes(header[92:96], "big")
    change_counter = int.from_bytes(header[24:28], "big")
    if size < page_size or (n_pages and valid_for == change_counter and size < n_pages * page_size):
        raise StoreError(f"run store {path} is truncated ({size} of {max(n_pages, 1) * page_size} bytes); "
                         f"restore a backup (docs/store.md)")
    return "ok"




def _sqlite_connect_pragmas(dbapi_conn, *, readonly: bool) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not readonly:
            retry_busy(lambda: cur.execute("PRAGMA journal_mode=WAL").fetchall())
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the process
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _frozen(path: Path) -> bool:
    """Whether a read-only open must treat the file as immutable: its folder is not writable
    (SQLite's WAL mode needs its ``-shm`` / ``-wal`` side files there even to read) and no
    write-ahead log is pending, so no writer can be active and the file holds every commit.
    (A writer could only appear with permissions this process lacks; see docs/store.md.)"""
    if os.access(path.parent, os.W_OK):
        return False
    wal = path.with_name(path.name + "-wal")
    return not wal.exists() or wal.stat().st_size == 0


#: How long a read-only open retries SQLite's transient "disk I/O error": a read-only connection
#: cannot rebuild the WAL index, so it fails when it opens just as the store's last writer closes
#: and removes its -shm / -wal files (a `kdbench run` ending beside a `show` or a refused resume).
READONLY_OPEN_RETRY_S = 5.0


def _connect_readonly(uri: str) -> sqlite3.Connection:
    deadline = time.monotonic() + READONLY_OPEN_RETRY_S
    delay = 0.01
    while True:
        con = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        try:
            con.execute("PRAGMA schema_version").fetchone()  # the first read is where it fails
            return con
        except sqlite3.OperationalError as exc:
            con.close()
            if "disk i/o error" not in str(exc).lower() or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _make_sqlite_engine(loc: Location, *, readonly: bool) -> Engine:
    if loc.url.get_driver_name() not in ("pysqlite", ""):
        raise StoreError(f"cannot open run store {loc.display}: SQLite driver {loc.url.get_driver_name()!r} is not "
                         f"supported (use sqlite:/// or sqlite+pysqlite:///)")
    if readonly:
        path = loc.path
        uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro" + ("&immutable=1" if _frozen(path) else "")

        def creator():
            return _connect_readonly(uri)

        engine = create_engine(f"sqlite+pysqlite:///{path}", creator=creator)
    else:
        connect_args = {} if "timeout" in loc.url.query else {"timeout": BUSY_TIMEOUT_MS / 1000}
        engine = create_engine(loc.url, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        _sqlite_connect_pragmas(dbapi_conn, readonly=readonly)

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # kdbench's own write transactions take the write lock up front (BEGIN IMMEDIATE), so a
        # read-then-write can never fail half-way on a concurrent commit; everything else is a
        # plain deferred transaction (readers never block each other or a writer).
        immediate = not readonly and conn.get_execution_options().get(IMMEDIATE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine




#: Seconds a server database may take to accept a connection before the command gives up with
#: one line (a host that accepts TCP and never answers would otherwise hang it). A URL's own
#: ``connect_timeout`` query parameter wins; ``$KDBENCH_DB_CONNECT_TIMEOUT`` overrides the default.
CONNECT_TIMEOUT_S = 10
CONNECT_TIMEOUT_VAR = "KDBENCH_DB_CONNECT_TIMEOUT"


def connect_timeout_s() -> int:
    raw = os.environ.get(CONNECT_TIMEOUT_VAR, "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S
    if not re.fullmatch(r"\d{1,6}", raw) or int(raw) < 1:
        raise StoreError(f"${CONNECT_TIMEOUT_VAR} must be a whole number of seconds (at least 1), got {raw!r}")
    return int(raw)


def _make_other_engine(loc: Location, *, readonly: bool) -> Engine:
    connect_args: dict[str, Any] = {}
    if loc.url.get_backend_name() in ("postgresql", "mysql", "mariadb") and "connect_timeout" not in loc.url.query:
        connect_args["connect_timeout"] = connect_timeout_s()  # libpq and MySQL drivers both take seconds
    try:
        engine = create_engine(loc.url, connect_args=connect_args)
    except Exception as exc:  # bad URL, unknown dialect, missing driver
        raise StoreError(f"cannot open run store {loc.display!r}: {first_line(exc)}") from None
    if readonly:
        engine = _readonly_other(engine)
    return engine


def _readonly_other(engine: Engine) -> Engine:
    """Every transaction read-only: PostgreSQL's own option where the driver has it, else
    ``SET TRANSACTION READ ONLY`` as the first statement of each transaction."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(postgresql_readonly=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


def open_engine(db: str | None = None, *, readonly: bool = False, allow_memory: bool = False) -> Engine:
    """Open a run store; writers create, stamp or migrate it (see the module docstring).

    ``readonly=True`` never creates a file or a table and refuses every write (SQLite: the file
    is opened with ``mode=ro``; other databases: read-only transactions). A read-only open of a
    store with no tables succeeds (``has_schema`` is then False); one of an older schema reads
    it as is through per-connection temporary views (SQLite; other databases are refused with
    a hint). An in-memory SQLite store (``sqlite://``) is refused unless ``allow_memory``: every
    result in it would be gone when the command ends. Everything else that is wrong raises
    :class:`StoreError`, one line.
    """
    loc = locate(db)
    if loc.sqlite:
        if loc.memory:
            if readonly:
                raise StoreError("an in-memory run store cannot be opened read-only (it would be empty)")
            if not allow_memory:
                raise StoreError(f"run store {loc.display} is in memory: every result would be lost when the "
                                 f"command ends; name a file (--db runs.db) or a database server URL")
        elif readonly:
            check_sqlite_file(loc.path, must_exist=True)
        else:
            state = check_sqlite_file(loc.path, must_exist=False)
            parent = loc.path.parent
            if not parent.is_dir():
                why = "is not a directory" if parent.exists() else "does not exist"
                raise StoreError(f"cannot create run store {loc.path}: directory {parent} {why}")
            if state == "missing" and not os.access(parent, os.W_OK):
                raise StoreError(f"cannot write run store {loc.path}: permission denied")
            if state != "missing" and not os.access(loc.path, os.W_OK):
                raise StoreError(f"cannot write run store {loc.path}: permission denied")
            if state != "missing" and not os.access(parent, os.W_OK):
                raise StoreError(f"cannot write run store {loc.path}: directory {parent} is not writable "
                                 f"(SQLite needs it for the -wal file)")
            if state == "ok":
                _probe(loc)  # a foreign, newer or damaged file is refused before a writer touches it
        engine = _make_sqlite_engine(loc, readonly=readonly)
    else:
        engine = _make_other_engine(loc, readonly=readonly)
    try:
        prepare_schema(engine, loc, readonly=readonly)
    except StoreError:
        engine.dispose()
        raise
    except sa_exc.SQLAlchemyError as exc:
        engine.dispose()
        verb = "read" if readonly else "write"
        hint = ""
        if readonly and loc.path is not None and not os.access(loc.path.parent, os.W_OK):
            hint = (f" (folder {loc.path.parent} is not writable and the store has a pending write-ahead log, which "
                    f"SQLite must write beside it to read: copy {loc.path.name} and its -wal file to a writable "
                    f"folder and read the copy)")
        raise StoreError(f"cannot {verb} run store {loc.display}: {first_line(exc)}{hint}") from None
    return engine


def _probe(loc: Location) -> None:
    """Read-only look at an existing SQLite file before a writer opens it (setting WAL alone would
    change the file's header): refuses what ``read_schema_state`` refuses."""
    probe = _make_sqlite_engine(loc, readonly=True)
    try:
        with probe.connect() as conn:
            state = read_schema_state(conn, loc.display)
        if state.version == SCHEMA_VERSION and state.missing:
            raise damaged_store(loc.display, state.missing)
    except sa_exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read run store {loc.display}: {first_line(exc)}") from None
    finally:
        probe.dispose()
