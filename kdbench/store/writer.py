"""Writing runs: :class:`RunWriter` (one short transaction per event: start, curve point,
results, finish, failure) and deleting runs with everything that hangs off them."""

from __future__ import annotations

import json
from typing import Any, Iterable

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from kdbench.store.models import Artifact, CurvePoint, Metric, Run, Sample, StoreError, utcnow
from kdbench.store.transactions import in_transaction

_RUN_COLUMNS = frozenset(c.name for c in Run.__table__.columns) - {"id"}


class OwnershipLost(StoreError):
    """The run row names another owner (a resume took over a run whose heartbeat went stale):
    this process must stop writing it."""


class RunWriter:
    """Records one run. Each method is its own short transaction (retried on busy/locked).

    ``owner`` — ``(host, pid)`` of the process that owns the run (kdbench/lifecycle.py
    ``claim_run``) — fences every write: inside the write's own transaction the row must still
    name that owner, else :class:`OwnershipLost` is raised and nothing is written. So a process
    that lost its run (it hung, its heartbeat went stale, another one resumed the run) can never
    overwrite the new owner's rows. ``None`` writes unfenced (tests, reference rows)."""

    def __init__(self, engine: Engine, run_id: int, owner: tuple[str, int] | None = None):
        self.engine = engine
        self.run_id = run_id
        self.owner = owner

    def _in_transaction(self, fn):
        """``fn(session)`` in one write transaction, after checking that this process still owns the run."""
        def write(s: Session):
            self._check_owner(s)
            return fn(s)

        return in_transaction(self.engine, write)

    def _check_owner(self, s: Session) -> None:
        if self.owner is None:
            return
        row = s.execute(select(Run.host, Run.pid).where(Run.id == self.run_id)).one_or_none()
        if row is None:
            raise StoreError(f"run {self.run_id} is no longer in the store (deleted by `kdbench gc --delete`?)")
        if (row.host, row.pid) != tuple(self.owner):
            raise OwnershipLost(f"run {self.run_id} is now owned by process {row.pid} on {row.host}; this process "
                                f"({self.owner[1]} on {self.owner[0]}) stopped without writing it")

    def check_owner(self) -> None:
        """Raise :class:`OwnershipLost` unless this process still owns the run (a read)."""
        with Session(self.engine) as s:
            self._check_owner(s)

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

        owner = (fields["host"], fields["pid"]) if fields.get("host") and fields.get("pid") else None
        return cls(engine, in_transaction(engine, write), owner)

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

        self._in_transaction(write)

    def curve(self, step: int, loss: float | None, *, split: str = "train", terms: dict | None = None,
              lr: float | None = None, tokens: int | None = None, elapsed_s: float | None = None) -> None:
        self._in_transaction(lambda s: s.add(CurvePoint(
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
        self._in_transaction(lambda s: s.add_all(objs))

    def samples(self, rows: Iterable[dict]) -> None:
        """rows: dicts with task, prompt_id, seed, prompt, output, reference, scores."""
        objs = self._sample_rows(list(rows))
        self._in_transaction(lambda s: s.add_all(objs))

    def results(self, metrics_rows: Iterable[tuple[str, str, float, int | None]], sample_rows: Iterable[dict]) -> None:
        """A run's evaluation, metrics and samples together, in ONE transaction: a reader never
        sees metrics without their samples, and a crash leaves neither."""
        m, smp = self._metric_rows(list(metrics_rows)), self._sample_rows(list(sample_rows))

        def write(s: Session) -> None:
            s.add_all(m)
            s.add_all(smp)

        self._in_transaction(write)

    def artifact(self, name: str, data: Any) -> None:
        self._in_transaction(lambda s: s.add(Artifact(run_id=self.run_id, name=name, data=data)))

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

        return self._in_transaction(write)

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
