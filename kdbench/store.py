"""The run store: every run's configuration, provenance, curves, metrics and samples.

SQLAlchemy 2 models over SQLite ``runs.db`` by default; any SQLAlchemy URL works
(``--db postgresql://...``). The schema is documented in README.md ("Result schema");
change both together and bump ``SCHEMA_VERSION``.

Writers open short transactions per event (run start, a curve point, the final metrics)
so several processes can share one SQLite file: WAL journal plus a busy timeout make
concurrent writers wait instead of failing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

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


# ---------------------------------------------------------------------------- engine


def resolve_url(db: str | None) -> str:
    """A path, a SQLAlchemy URL, or None (``$KDBENCH_DB``, else ``runs.db`` in the cwd)."""
    db = db or os.environ.get(DB_ENV_VAR) or DEFAULT_DB
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def open_engine(db: str | None = None, *, readonly: bool = False) -> Engine:
    """Open (and for writers, create) the store. Bad locations raise a one-line UserError."""
    url = resolve_url(db)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if readonly:
            if not path.exists():
                raise UserError(f"no run store at {path} (run `kdbench run` first or pass --db)")
            engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
            return engine
        parent = path.parent
        if not parent.is_dir():
            raise UserError(f"cannot create run store {path}: directory {parent} does not exist")
        if path.exists() and not os.access(path, os.W_OK) or not path.exists() and not os.access(parent, os.W_OK):
            raise UserError(f"cannot write run store {path}: permission denied")
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        try:
            engine = create_engine(url)
        except Exception as exc:  # bad URL or missing driver
            raise UserError(f"cannot open run store {url!r}: {exc}") from None
    if not readonly:
        try:
            Base.metadata.create_all(engine)
            with Session(engine) as s:
                row = s.get(Meta, "schema_version")
                if row is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                    s.commit()
                elif row.value == "1":
                    _migrate_1_to_2(engine)
        except Exception as exc:
            raise UserError(f"cannot write run store {url}: {str(exc).splitlines()[0]}") from None
    return engine


_V2_RUN_COLUMNS = {"config_hash": "VARCHAR(64)", "sweep_id": "VARCHAR(64)", "host": "VARCHAR(256)",
                   "pid": "INTEGER", "heartbeat_at": "DATETIME", "state_path": "TEXT"}


def _migrate_1_to_2(engine: Engine) -> None:
    """Schema 1 -> 2: the runs table gains identity and lifecycle columns (all nullable)."""
    from sqlalchemy import text

    have = {c["name"] for c in inspect(engine).get_columns("runs")}
    with engine.begin() as conn:
        for name, sql_type in _V2_RUN_COLUMNS.items():
            if name not in have:
                conn.execute(text(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}"))
        conn.execute(text("UPDATE kdbench_meta SET value = '2' WHERE key = 'schema_version'"))


def has_schema(engine: Engine) -> bool:
    return inspect(engine).has_table("runs")


# ---------------------------------------------------------------------------- writer


class RunWriter:
    """Records one run. Each method is its own short transaction."""

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
    ) -> "RunWriter":
        with Session(engine) as s:
            run = Run(
                role=role,
                objective=objective,
                params=params or {},
                setting=setting,
                suite=suite,
                suite_version=suite_version,
                seed=seed,
                status="running",
                config=config,
                provenance=provenance,
            )
            s.add(run)
            s.commit()
            return cls(engine, run.id)

    def update(self, **fields: Any) -> None:
        with Session(self.engine) as s:
            run = s.get(Run, self.run_id)
            for k, v in fields.items():
                setattr(run, k, v)
            s.commit()

    def curve(self, step: int, loss: float | None, *, split: str = "train", terms: dict | None = None,
              lr: float | None = None, tokens: int | None = None, elapsed_s: float | None = None) -> None:
        with Session(self.engine) as s:
            s.add(CurvePoint(run_id=self.run_id, step=step, split=split, loss=loss, terms=terms or {},
                             lr=lr, tokens=tokens, elapsed_s=elapsed_s))
            s.commit()

    def metrics(self, rows: Iterable[tuple[str, str, float, int | None]]) -> None:
        """rows: (task, metric, value, seed)."""
        with Session(self.engine) as s:
            s.add_all(Metric(run_id=self.run_id, task=t, metric=m, value=float(v), seed=sd) for t, m, v, sd in rows)
            s.commit()

    def samples(self, rows: Iterable[dict]) -> None:
        """rows: dicts with task, prompt_id, seed, prompt, output, reference, scores."""
        with Session(self.engine) as s:
            for r in rows:
                ref = r["reference"]
                s.add(Sample(run_id=self.run_id, task=r["task"], prompt_id=str(r["prompt_id"]), seed=r.get("seed"),
                             prompt=r["prompt"], output=r["output"],
                             reference=ref if isinstance(ref, str) else json.dumps(ref),
                             scores=r.get("scores") or {}))
            s.commit()

    def artifact(self, name: str, data: Any) -> None:
        with Session(self.engine) as s:
            s.add(Artifact(run_id=self.run_id, name=name, data=data))
            s.commit()

    def finish(self, **fields: Any) -> None:
        self.update(status="finished", finished_at=utcnow(), **fields)

    def fail(self, reason: str) -> None:
        self.update(status="failed", finished_at=utcnow(), error=reason[:4000])


# ---------------------------------------------------------------------------- reader


def get_run(engine: Engine, run_id: int) -> Run | None:
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
