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

Layout: ``models`` (tables, constants) ← ``location`` (where a store is) ← ``transactions`` ←
``schema`` (detection, migrations) ← ``engines`` (:func:`open_engine`) ← ``writer``
(:class:`RunWriter`); the readers are here.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from kdbench.secrets import redact_url
from kdbench.store.engines import check_sqlite_file, open_engine  # noqa: F401  (the store's public names, re-exported)
from kdbench.store.location import Location, locate, resolve_url  # noqa: F401  (the store's public names, re-exported)
from kdbench.store.models import (  # noqa: F401  (the store's public names, re-exported)
    BUSY_TIMEOUT_MS,
    DB_ENV_VAR,
    DEFAULT_DB,
    IMMEDIATE_OPTION,
    RETRY_BUDGET_S,
    ROLE_ANALYSIS,
    ROLE_DISTILLED,
    ROLE_STUDENT_INIT,
    ROLE_TEACHER,
    SCHEMA_VERSION,
    SQLITE_MAX_INT,
    STATUSES,
    Artifact,
    Base,
    CurvePoint,
    Meta,
    Metric,
    Run,
    Sample,
    StoreError,
    utcnow,
)
from kdbench.store.schema import (  # noqa: F401  (the store's public names, re-exported)
    MIGRATIONS,
    SchemaState,
    backup_sqlite,
    has_schema,
    prepare_schema,
    read_schema_state,
)
from kdbench.store.transactions import (  # noqa: F401  (the store's public names, re-exported)
    in_transaction,
    is_busy_error,
    retry_busy,
    writing,
)
from kdbench.store.writer import (  # noqa: F401  (the store's public names, re-exported)
    OwnershipLost,
    RunWriter,
    delete_run_rows,
    delete_runs,
)


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
    """How messages name a store: the file of a SQLite store, else the URL without its secrets."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database:
        return url.database
    return redact_url(url)


def require_schema(engine: Engine) -> None:
    """For commands that read runs: a store without kdbench tables (an empty file) is an error."""
    if not has_schema(engine):
        raise StoreError(f"run store {display_name(engine)} is empty (no kdbench tables); nothing to read")
