"""Where the store is and how it is opened: URLs and paths, the SQLite file checks, engines
(read-only for every URL), and :func:`open_engine`, which checks the schema before anything
is written."""

from __future__ import annotations

import os
import re
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url

from kdbench.store.models import (
    BUSY_TIMEOUT_MS,
    DB_ENV_VAR,
    DEFAULT_DB,
    IMMEDIATE_OPTION,
    SCHEMA_VERSION,
    StoreError,
)
from kdbench.store.schema import damaged_store, prepare_schema, read_schema_state
from kdbench.store.transactions import retry_busy


#: ``scheme://user:password@`` in a word (``--db postgresql+psycopg://…``), up to the word's last ``@``
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)\S*(@)(?=[^@]*$)")


def redact(word: str) -> str:
    """``word`` with a URL's password replaced by ``***``: what is stored (a run's provenance, in
    every row of a store the whole team reads) or printed never holds it."""
    return _URL_PASSWORD.sub(r"\1***\2", word)


def resolve_url(db: str | None) -> str:
    """A path, a SQLAlchemy URL, or None (``$KDBENCH_DB``, else ``runs.db`` in the cwd)."""
    db = db or os.environ.get(DB_ENV_VAR) or DEFAULT_DB
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


@dataclass(frozen=True)
class Location:
    """Where a store lives: ``url`` (parsed), ``path`` for a SQLite file (None: in memory or
    another database), ``display`` for messages (SQLite: the path; else the URL, no password)."""

    url: Any
    path: Path | None
    memory: bool
    display: str

    @property
    def sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"


def locate(db: str | None) -> Location:
    """Parse any spelling of a store location (``sqlite:///``, ``sqlite+pysqlite:///``, with or
    without a query string, ``file:`` URIs with ``uri=true``, other SQLAlchemy URLs)."""
    raw = resolve_url(db)
    try:
        url = make_url(raw)
    except Exception as exc:  # ArgumentError and friends: not a URL at all
        raise StoreError(f"cannot open run store {raw!r}: not a path or a SQLAlchemy URL ({_first_line(exc)})") from None
    if url.get_backend_name() != "sqlite":
        return Location(url, None, False, url.render_as_string(hide_password=True))
    database = url.database or ""
    query = {k: (v if isinstance(v, str) else v[-1]) for k, v in url.query.items()}
    if query.get("uri", "").lower() in ("true", "1"):
        rest = database[len("file:"):] if database.startswith("file:") else database
        rest, _, uri_query = rest.partition("?")
        if not rest or rest == ":memory:" or "mode=memory" in uri_query or query.get("mode") == "memory":
            return Location(url, None, True, raw)
        path = Path(urllib.parse.unquote(rest)).expanduser().resolve()
    elif not database or database == ":memory:":
        return Location(url, None, True, raw)
    else:
        path = Path(database).expanduser().resolve()
        url = url.set(database=str(path))
    return Location(url, path, False, str(path))


def _first_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return (text_.splitlines() or [type(exc).__name__])[0]



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


def _make_sqlite_engine(loc: Location, *, readonly: bool) -> Engine:
    if loc.url.get_driver_name() not in ("pysqlite", ""):
        raise StoreError(f"cannot open run store {loc.display}: SQLite driver {loc.url.get_driver_name()!r} is not "
                         f"supported (use sqlite:/// or sqlite+pysqlite:///)")
    if readonly:
        path = loc.path
        uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"

        def creator():
            return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)

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




def _make_other_engine(loc: Location, *, readonly: bool) -> Engine:
    try:
        engine = create_engine(loc.url)
    except Exception as exc:  # bad URL, unknown dialect, missing driver
        raise StoreError(f"cannot open run store {loc.display!r}: {_first_line(exc)}") from None
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


def open_engine(db: str | None = None, *, readonly: bool = False) -> Engine:
    """Open a run store; writers create, stamp or migrate it (see the module docstring).

    ``readonly=True`` never creates a file or a table and refuses every write (SQLite: the file
    is opened with ``mode=ro``; other databases: read-only transactions). A read-only open of a
    store with no tables succeeds (``has_schema`` is then False); one of an older schema reads
    it as is through per-connection temporary views (SQLite; other databases are refused with
    a hint). Everything else that is wrong raises :class:`StoreError`, one line.
    """
    loc = locate(db)
    if loc.sqlite:
        if loc.memory:
            if readonly:
                raise StoreError("an in-memory run store cannot be opened read-only (it would be empty)")
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
        raise StoreError(f"cannot {verb} run store {loc.display}: {_first_line(exc)}") from None
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
        raise StoreError(f"cannot read run store {loc.display}: {_first_line(exc)}") from None
    finally:
        probe.dispose()
