"""What a store holds and how an older one becomes current: schema detection, the refusal of
foreign / newer / damaged stores, the backup taken before a migration, the migrations."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import event, inspect, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.schema import CreateIndex, CreateTable

from kdbench.store.location import Location
from kdbench.store.models import BUSY_TIMEOUT_MS, SCHEMA_VERSION, Base, Meta, StoreError
from kdbench.store.transactions import retry_busy, writing


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


def damaged_store(display: str, missing: dict) -> StoreError:
    parts = [f"table {t} is missing" if cols == ["*"] else f"table {t} has no column(s) {', '.join(cols)}"
             for t, cols in missing.items()]
    return StoreError(f"run store {display} is damaged: {'; '.join(parts)} (schema {SCHEMA_VERSION} has them); "
                      f"restore a backup (docs/store.md)")


#: The PostgreSQL advisory lock the openers of one database take around creating or migrating
#: its schema (any 64-bit number no other program on the database uses: "kdbench" in ASCII).
SCHEMA_LOCK_KEY = int.from_bytes(b"kdbench", "big")


def take_schema_lock(conn) -> None:
    """Make the openers of one store take turns at its schema. SQLite's ``BEGIN IMMEDIATE``
    already does. PostgreSQL's DDL is transactional but not serialised: two first openers of a
    new database both see no tables, both ``CREATE TABLE``, and the second fails on the catalog's
    unique index (``pg_type_typname_nsp_index``) instead of waiting (a sweep's workers, a team's
    first runs). A transaction-scoped advisory lock makes the second wait for the first's commit,
    then find the schema made. Other servers: as they come (not tested)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})


def has_schema(engine: Engine) -> bool:
    return inspect(engine).has_table("runs")


def prepare_schema(engine: Engine, loc: Location, *, readonly: bool) -> None:
    display = loc.display
    if readonly:
        with engine.connect() as conn:
            state = read_schema_state(conn, display)
        if state.version is None or state.version == SCHEMA_VERSION:
            if state.missing:
                raise damaged_store(display, state.missing)
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
            take_schema_lock(conn)
            state = read_schema_state(conn, display)
            if state.version is None:
                Base.metadata.create_all(conn)
                conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                conn.commit()
                return
            if state.version == SCHEMA_VERSION:
                if state.missing:
                    raise damaged_store(display, state.missing)
                conn.rollback()
                return
            backup = backup_sqlite(loc.path, state.version) if loc.path is not None else None
            for v in range(state.version, SCHEMA_VERSION):
                MIGRATIONS[v](conn)
            conn.execute(update(Meta.__table__).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION)))
            after = read_schema_state(conn, display)
            if after.missing:
                raise damaged_store(display, after.missing)
            conn.commit()
            note = f" (backup: {backup})" if backup else " (no backup made: not a SQLite file)"
            print(f"kdbench: migrated run store {display} from schema {state.version} to {SCHEMA_VERSION}{note}",
                  file=sys.stderr)

    retry_busy(attempt)


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
