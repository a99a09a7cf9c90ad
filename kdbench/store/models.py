"""The store's tables (SQLAlchemy 2 models) and constants: what a run row holds.

The schema is documented in README.md ("Result schema") and docs/store.md; change them
together and bump ``SCHEMA_VERSION`` with a step in kdbench/store/schema.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

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
    suite_version: Mapped[str] = mapped_column(String(512))  # "3+finetune_steps=2,steps=3,..." labels: long
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
