"""The run store: every run's configuration, provenance, curves, metrics and samples.

SQLAlchemy 2 models over SQLite ``runs.db`` by default; any SQLAlchemy URL works
(``--db postgresql://...``). The schema is documented in README.md ("Result schema") and
docs/store.md (migrations, backups, concurrency, read-only opens); change them together and
bump ``SCHEMA_VERSION`` with a step in ``MIGRATIONS``.

Opening (:func:`open_engine`) checks what is there before anything is written: a new (empty)
store is created and stamped, an older kdbench store is backed up and migrated in place, a
newer one, a foreign database or a damaged store is refused with one line (:class:`StoreError`).

Writers open one short transaction per event (run start, curve point, results, finish). On
SQLite each of these starts with ``BEGIN IMMEDIATE`` (:func:`writing`: the write lock is taken
up front, so a read-then-write never fails half-way; plain reads stay deferred), the busy timeout makes
concurrent writers wait, and a busy/locked error that still escapes is retried with
exponential backoff and jitter (:func:`in_transaction`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import sqlite3
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.schema import CreateIndex, CreateTable

from kdbench.errors import UserError

SCHEMA_VERSION = 2  # 2: runs.config_hash, sweep_id, host, pid, heartbeat_at, state_path; status "interrupted"
DEFAULT_DB = "runs.db"
DB_ENV_VAR = "KDBENCH_DB"

# Run roles: a distillation run, or a reference row evaluated once per suite.
ROLE_DISTILLED = "distilled"
ROLE_TEACHER = "teacher"
ROLE_STUDENT_INIT = "student-init"
ROLE_ANALYSIS = "analysis"
STATUSES = ("running", "finished", "failed", "interrupted")

BUSY_TIMEOUT_MS = 30_000       # SQLite waits this long for a lock before reporting "database is locked"
RETRY_BUDGET_S = 120.0         # then in_transaction retries, with backoff, for at most this long in all
SQLITE_MAX_INT = 2**63 - 1
IMMEDIATE_OPTION = "kdbench_immediate"


class StoreError(UserError):
    """The run store cannot be used as asked: missing, not a kdbench store, newer, damaged."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    role: Mapped[str] = mapped_column(String(32), index=True, default=ROLE_DISTILLED)
    objective: Mapped[str | None] = mapped_column(String(128), index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # Canonical "name(k=v,...)" string: one leaderboard row per objective and setting.
    setting: Mapped[str | None] = mapped_column(String(512), index=True)
    suite: Mapped[str] = mapped_column(String(128), index=True)
    suite_version: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True, default="running")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    provenance: Mapped[dict] = mapped_column(JSON, default=dict)
    # Cost columns, filled when training ends.
    wall_time_s: Mapped[float | None] = mapped_column(Float)
    train_tokens_per_s: Mapped[float | None] = mapped_column(Float)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float)
    # Checkpoint selection: the rule and the chosen step, recorded with the result.
    selection_rule: Mapped[str | None] = mapped_column(String(256))
    selected_step: Mapped[int | None] = mapped_column(Integer)
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    # Identity of the experiment: a hash of the resolved configuration (objective setting, suite
    # and version label, training seed). Two runs with one hash are repeats of one experiment.
    config_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    sweep_id: Mapped[str | None] = mapped_column(String(64), index=True)  # the `kdbench sweep` it belongs to
    # Lifecycle: who runs it and when it last proved alive (a dead process's run is "interrupted").
    host: Mapped[str | None] = mapped_column(String(256))
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    state_path: Mapped[str | None] = mapped_column(Text)  # resumable training state (kdbench run --resume)

    metrics: Mapped[list["Metric"]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Metric(Base):
    """One number: a metric of one task for one sampling seed (seed NULL: seed-free metric)."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    task: Mapped[str] = mapped_column(String(128), index=True)
    metric: Mapped[str] = mapped_column(String(64), index=True)
    value: Mapped[float] = mapped_column(Float)
    seed: Mapped[int | None] = mapped_column(Integer)

    run: Mapped[Run] = relationship(back_populates="metrics")


class CurvePoint(Base):
    """Training curve: the loss and the objective's terms at one optimiser step."""

    __tablename__ = "curves"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16), default="train")  # train | valid
    loss: Mapped[float | None] = mapped_column(Float)
    terms: Mapped[dict] = mapped_column(JSON, default=dict)
    lr: Mapped[float | None] = mapped_column(Float)
    tokens: Mapped[int | None] = mapped_column(Integer)
    elapsed_s: Mapped[float | None] = mapped_column(Float)


class Sample(Base):
    """One sampled response with its per-sample scores (so any aggregate can be recomputed)."""

    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    task: Mapped[str] = mapped_column(String(128), index=True)
    prompt_id: Mapped[str] = mapped_column(String(128), index=True)
    seed: Mapped[int | None] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    output: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text)  # JSON list when a prompt has several
    scores: Mapped[dict] = mapped_column(JSON, default=dict)


class Artifact(Base):
    """Structured results that are not one number: gradient-similarity matrices, lm-eval output."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    data: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Meta(Base):
    __tablename__ = "kdbench_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# ---------------------------------------------------------------------------- locations


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


# ---------------------------------------------------------------------------- the SQLite file

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


# ---------------------------------------------------------------------------- engines


def _sqlite_connect_pragmas(dbapi_conn, *, readonly: bool) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not readonly:
            _retry_busy(lambda: cur.execute("PRAGMA journal_mode=WAL").fetchall())
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


def writing(engine: Engine) -> Engine:
    """The engine for one of kdbench's write transactions (SQLite: ``BEGIN IMMEDIATE``)."""
    return engine.execution_options(**{IMMEDIATE_OPTION: True})


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
            raise _damaged(loc.display, state.missing)
    except sa_exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read run store {loc.display}: {_first_line(exc)}") from None
    finally:
        probe.dispose()


# ---------------------------------------------------------------------------- schema


@dataclass
class SchemaState:
    tables: set
    version: int | None          # None: no tables at all (a new store)
    missing: dict                # table -> missing columns ("*" for a missing table), for the current version


def read_schema_state(conn, display: str) -> SchemaState:
    """What the store holds; refuses anything that is not a kdbench store of a known schema."""
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    if not tables:
        return SchemaState(tables, None, {})
    if "kdbench_meta" not in tables or "runs" not in tables:
        what = "no kdbench_meta table" if "kdbench_meta" not in tables else "no runs table"
        shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
        raise StoreError(f"{display} is not a kdbench run store ({what}; tables: {shown}); refusing to touch it")
    row = conn.execute(text("SELECT value FROM kdbench_meta WHERE key = 'schema_version'")).first()
    if row is None:
        raise StoreError(f"{display} is not a kdbench run store (kdbench_meta has no schema_version); "
                         f"refusing to touch it")
    try:
        version = int(str(row[0]).strip())
    except ValueError:
        raise StoreError(f"{display} has an unreadable schema_version {row[0]!r}; refusing to touch it") from None
    if version > SCHEMA_VERSION:
        raise StoreError(f"run store {display} has schema {version}; this kdbench reads schema {SCHEMA_VERSION} "
                         f"— upgrade kdbench")
    if version < 1:
        raise StoreError(f"{display} has an unknown schema_version {version}; refusing to touch it")
    missing = {}
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            missing[table.name] = ["*"]
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        lacking = [c.name for c in table.columns if c.name not in have]
        if lacking:
            missing[table.name] = lacking
    return SchemaState(tables, version, missing)


def _damaged(display: str, missing: dict) -> StoreError:
    parts = [f"table {t} is missing" if cols == ["*"] else f"table {t} has no column(s) {', '.join(cols)}"
             for t, cols in missing.items()]
    return StoreError(f"run store {display} is damaged: {'; '.join(parts)} (schema {SCHEMA_VERSION} has them); "
                      f"restore a backup (docs/store.md)")


def has_schema(engine: Engine) -> bool:
    return inspect(engine).has_table("runs")


def prepare_schema(engine: Engine, loc: Location, *, readonly: bool) -> None:
    display = loc.display
    if readonly:
        with engine.connect() as conn:
            state = read_schema_state(conn, display)
        if state.version is None or state.version == SCHEMA_VERSION:
            if state.missing:
                raise _damaged(display, state.missing)
            if loc.sqlite:
                _install_read_shims(engine, {})
            return
        # an older store, read as is: writes would need a migration, reads need the new columns
        if not loc.sqlite:
            raise StoreError(f"run store {display} has schema {state.version}; this kdbench reads schema "
                             f"{SCHEMA_VERSION}: open it once with a writing command (e.g. `kdbench gc --mark`) "
                             f"to migrate it")
        _install_read_shims(engine, state.missing)
        return

    def attempt():
        with writing(engine).connect() as conn:  # SQLite: BEGIN IMMEDIATE at the first statement
            state = read_schema_state(conn, display)
            if state.version is None:
                Base.metadata.create_all(conn)
                conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                conn.commit()
                return
            if state.version == SCHEMA_VERSION:
                if state.missing:
                    raise _damaged(display, state.missing)
                conn.rollback()
                return
            backup = backup_sqlite(loc.path, state.version) if loc.path is not None else None
            for v in range(state.version, SCHEMA_VERSION):
                MIGRATIONS[v](conn)
            conn.execute(update(Meta.__table__).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION)))
            after = read_schema_state(conn, display)
            if after.missing:
                raise _damaged(display, after.missing)
            conn.commit()
            note = f" (backup: {backup})" if backup else " (no backup made: not a SQLite file)"
            print(f"kdbench: migrated run store {display} from schema {state.version} to {SCHEMA_VERSION}{note}",
                  file=sys.stderr)

    _retry_busy(attempt)


def backup_sqlite(path: Path, version: int) -> Path:
    """A consistent copy next to the store, made with SQLite's online backup API:
    ``<store>.bak-schema<version>-<UTC timestamp>`` (``-2``, ``-3``, ... if that name exists)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = path.with_name(f"{path.name}.bak-schema{version}-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.bak-schema{version}-{stamp}-{n}")
    src = sqlite3.connect("file:" + urllib.parse.quote(str(path)) + "?mode=ro", uri=True,
                          timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        dst = sqlite3.connect(str(dest))
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal / -shm beside it
        finally:
            dst.close()
    except sqlite3.Error as exc:
        dest.unlink(missing_ok=True)
        raise StoreError(f"cannot back up run store {path} before migrating it: {exc}; nothing was changed") from None
    finally:
        src.close()
    return dest


def _add_columns(conn, table_name: str) -> None:
    """Add every column of the current model that ``table_name`` lacks (all nullable), and its indexes."""
    table = Base.metadata.tables[table_name]
    have = {c["name"] for c in inspect(conn).get_columns(table_name)}
    for col in table.columns:
        if col.name in have:
            continue
        if not col.nullable or col.primary_key:
            raise StoreError(f"migration cannot add the non-nullable column {table_name}.{col.name}")
        coltype = col.type.compile(dialect=conn.dialect)
        conn.execute(text(f'ALTER TABLE {table_name} ADD COLUMN "{col.name}" {coltype}'))
    indexes = {ix["name"] for ix in inspect(conn).get_indexes(table_name)}
    for ix in table.indexes:
        if ix.name not in indexes:
            conn.execute(CreateIndex(ix))


def _migrate_1_to_2(conn) -> None:
    """Schema 1 -> 2: runs gains config_hash, sweep_id (indexed), host, pid, heartbeat_at, state_path
    (all nullable; old rows keep NULL); tables that early schema-1 stores lacked are created."""
    Base.metadata.create_all(conn, checkfirst=True)
    _add_columns(conn, "runs")


# stored version -> the step that takes a store (inside one transaction) to the next version
MIGRATIONS: dict[int, Callable] = {1: _migrate_1_to_2}


def _install_read_shims(engine: Engine, missing: dict) -> None:
    """Every connection of a read-only SQLite engine ends with ``PRAGMA query_only=ON``. For an
    older store read as is (``missing`` non-empty), temporary views named like the tables come
    first (temp objects shadow main ones): they add the newer columns as NULL, and missing tables
    exist empty. Nothing is written to the file; the temp schema lives in memory."""
    statements = []
    for name, cols in missing.items():
        table = Base.metadata.tables[name]
        if cols == ["*"]:
            ddl = str(CreateTable(table).compile(dialect=engine.dialect)).strip()
            statements.append(re.sub(r"^CREATE TABLE", "CREATE TEMP TABLE", ddl))
        else:
            extra = ", ".join(f'NULL AS "{c}"' for c in cols)
            statements.append(f'CREATE TEMP VIEW "{name}" AS SELECT *, {extra} FROM main."{name}"')

    @event.listens_for(engine, "connect")
    def _shim(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA temp_store=MEMORY")
        for sql in statements:
            cur.execute(sql)
        cur.execute("PRAGMA query_only=ON")
        cur.close()

    engine.dispose()  # connections made before the shim existed are dropped


# ---------------------------------------------------------------------------- transactions

T = TypeVar("T")


def is_busy_error(exc: BaseException) -> bool:
    """SQLite busy/locked (and PostgreSQL serialization/deadlock) errors: retrying can succeed."""
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, sqlite3.OperationalError):
        msg = str(orig).lower()
        return "locked" in msg or "busy" in msg
    return getattr(orig, "pgcode", None) in ("40001", "40P01")


def _retry_busy(fn: Callable[[], T], *, budget_s: float = RETRY_BUDGET_S) -> T:
    deadline = time.monotonic() + budget_s
    delay = 0.005
    while True:
        try:
            return fn()
        except (sa_exc.OperationalError, sa_exc.DBAPIError, sqlite3.OperationalError) as exc:
            if not is_busy_error(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


def in_transaction(engine: Engine, fn: Callable[[Session], T]) -> T:
    """``fn(session)`` in one short transaction, committed; retried as a whole on busy/locked errors."""
    bound = writing(engine)

    def attempt():
        with Session(bound, expire_on_commit=False) as s:
            with s.begin():
                return fn(s)
    return _retry_busy(attempt)


# ---------------------------------------------------------------------------- writer

_RUN_COLUMNS = frozenset(c.name for c in Run.__table__.columns) - {"id"}


class RunWriter:
    """Records one run. Each method is its own short transaction (retried on busy/locked)."""

    def __init__(self, engine: Engine, run_id: int):
        self.engine = engine
        self.run_id = run_id

    @classmethod
    def start(
        cls,
        engine: Engine,
        *,
        role: str,
        suite: str,
        suite_version: str,
        seed: int,
        config: dict,
        provenance: dict,
        objective: str | None = None,
        params: dict | None = None,
        setting: str | None = None,
        **fields: Any,
    ) -> "RunWriter":
        """A new ``running`` row. ``fields``: other columns (config_hash, sweep_id, host, pid,
        heartbeat_at, state_path, ...)."""
        unknown = set(fields) - _RUN_COLUMNS
        if unknown:
            raise TypeError(f"RunWriter.start: unknown run column(s) {sorted(unknown)}")

        def write(s: Session) -> int:
            run = Run(role=role, objective=objective, params=params or {}, setting=setting, suite=suite,
                      suite_version=suite_version, seed=seed, status="running", config=config,
                      provenance=provenance, **fields)
            s.add(run)
            s.flush()
            return run.id

        return cls(engine, in_transaction(engine, write))

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - _RUN_COLUMNS
        if unknown:
            raise TypeError(f"RunWriter.update: unknown run column(s) {sorted(unknown)}")

        def write(s: Session) -> None:
            run = s.get(Run, self.run_id)
            if run is None:
                raise StoreError(f"run {self.run_id} is no longer in the store (deleted by `kdbench gc --delete`?)")
            for k, v in fields.items():
                setattr(run, k, v)

        in_transaction(self.engine, write)

    def curve(self, step: int, loss: float | None, *, split: str = "train", terms: dict | None = None,
              lr: float | None = None, tokens: int | None = None, elapsed_s: float | None = None) -> None:
        in_transaction(self.engine, lambda s: s.add(CurvePoint(
            run_id=self.run_id, step=step, split=split, loss=loss, terms=terms or {}, lr=lr, tokens=tokens,
            elapsed_s=elapsed_s)))

    def _metric_rows(self, rows) -> list[Metric]:
        return [Metric(run_id=self.run_id, task=t, metric=m, value=float(v), seed=sd) for t, m, v, sd in rows]

    def _sample_rows(self, rows) -> list[Sample]:
        out = []
        for r in rows:
            ref = r["reference"]
            out.append(Sample(run_id=self.run_id, task=r["task"], prompt_id=str(r["prompt_id"]), seed=r.get("seed"),
                              prompt=r["prompt"], output=r["output"],
                              reference=ref if isinstance(ref, str) else json.dumps(ref),
                              scores=r.get("scores") or {}))
        return out

    def metrics(self, rows: Iterable[tuple[str, str, float, int | None]]) -> None:
        """rows: (task, metric, value, seed)."""
        objs = self._metric_rows(list(rows))
        in_transaction(self.engine, lambda s: s.add_all(objs))

    def samples(self, rows: Iterable[dict]) -> None:
        """rows: dicts with task, prompt_id, seed, prompt, output, reference, scores."""
        objs = self._sample_rows(list(rows))
        in_transaction(self.engine, lambda s: s.add_all(objs))

    def results(self, metrics_rows: Iterable[tuple[str, str, float, int | None]], sample_rows: Iterable[dict]) -> None:
        """A run's evaluation, metrics and samples together, in ONE transaction: a reader never
        sees metrics without their samples, and a crash leaves neither."""
        m, smp = self._metric_rows(list(metrics_rows)), self._sample_rows(list(sample_rows))

        def write(s: Session) -> None:
            s.add_all(m)
            s.add_all(smp)

        in_transaction(self.engine, write)

    def artifact(self, name: str, data: Any) -> None:
        in_transaction(self.engine, lambda s: s.add(Artifact(run_id=self.run_id, name=name, data=data)))

    def finish(self, **fields: Any) -> None:
        self.update(status="finished", finished_at=utcnow(), **fields)

    def fail(self, reason: str) -> None:
        self.update(status="failed", finished_at=utcnow(), error=reason[:4000])

    def truncate_curve(self, after_step: int) -> int:
        """Delete curve points beyond ``after_step`` (a resumed run recomputes them: its curve
        never holds a step twice). Returns how many were deleted."""
        def write(s: Session) -> int:
            res = s.execute(delete(CurvePoint).where(CurvePoint.run_id == self.run_id, CurvePoint.step > after_step))
            return res.rowcount or 0

        return in_transaction(self.engine, write)

    def reopen(self) -> None:
        """A resumed run is running again (status, end time and error cleared)."""
        self.update(status="running", finished_at=None, error=None)

    def interrupt(self, reason: str = "interrupted") -> None:
        """The run stopped without finishing or failing (Ctrl-C, SIGTERM, lost process): status
        ``interrupted``; curves and any results written so far stay."""
        self.update(status="interrupted", finished_at=utcnow(), error=reason[:4000])


def delete_run_rows(s: Session, run_ids: list[int]) -> None:
    """Inside a transaction: delete runs and every row that refers to them (children first)."""
    if run_ids:
        for model in (Metric, CurvePoint, Sample, Artifact):
            s.execute(delete(model).where(model.run_id.in_(run_ids)))
        s.execute(delete(Run).where(Run.id.in_(run_ids)))


def delete_runs(engine: Engine, run_ids: Iterable[int], *, only_status: str | None = None) -> list[int]:
    """Delete runs with all their rows (metrics, curves, samples, artifacts) in one transaction.
    ``only_status``: delete only those still in that status (re-checked inside the transaction).
    Returns the ids deleted."""
    ids = sorted({int(i) for i in run_ids})

    def write(s: Session) -> list[int]:
        if not ids:
            return []
        q = select(Run.id).where(Run.id.in_(ids))
        if only_status is not None:
            q = q.where(Run.status == only_status)
        gone = list(s.scalars(q))
        delete_run_rows(s, gone)
        return gone

    return in_transaction(engine, write)


# ---------------------------------------------------------------------------- reader


def get_run(engine: Engine, run_id: int) -> Run | None:
    if not isinstance(run_id, int) or not 0 < run_id <= SQLITE_MAX_INT:
        return None
    with Session(engine, expire_on_commit=False) as s:
        return s.get(Run, run_id)


def find_reference_run(engine: Engine, role: str, suite: str, suite_version: str, fingerprint: str) -> Run | None:
    """The finished reference row (teacher / student-init) for this suite version and model pair."""
    with Session(engine, expire_on_commit=False) as s:
        q = (select(Run).where(Run.role == role, Run.suite == suite, Run.suite_version == suite_version,
                               Run.status == "finished").order_by(Run.id.desc()))
        for run in s.scalars(q):
            if run.config.get("reference_fingerprint") == fingerprint:
                return run
    return None


def run_metrics(engine: Engine, run_id: int) -> list[Metric]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Metric).where(Metric.run_id == run_id).order_by(Metric.task, Metric.metric,
                                                                                       Metric.seed)))


def display_name(engine: Engine) -> str:
    """How messages name a store: the file of a SQLite store, else the URL without its password."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database:
        return url.database
    return url.render_as_string(hide_password=True)


def require_schema(engine: Engine) -> None:
    """For commands that read runs: a store without kdbench tables (an empty file) is an error."""
    if not has_schema(engine):
        raise StoreError(f"run store {display_name(engine)} is empty (no kdbench tables); nothing to read")
