"""Run lifecycle: one owner per run, a heartbeat for live runs, the *effective* status of a run,
and garbage collection.

A run is owned by one live process at a time. :meth:`RunWriter.start` makes the process that
creates the row its owner (``host``, ``pid``); ``kdbench run --resume`` takes a run over with
:func:`claim_run`, an atomic check-and-set inside one write transaction (SQLite's ``BEGIN
IMMEDIATE``, a row lock elsewhere) that succeeds only when the run is not running — recorded
``interrupted`` or ``failed``, or ``running`` with its owner dead by the rules below — so of two
resumes started together exactly one proceeds and the other is refused before it has written
anything. Every later write of the run (:class:`RunWriter`, the heartbeat) is fenced on the owner
it names, so a process whose run was taken over writes nothing more.

A run row says ``running`` from :meth:`RunWriter.start` until ``finish`` / ``fail`` /
``interrupt``. A process that dies without reaching one of them (SIGKILL, OOM killer, power
loss, a closed laptop) leaves ``running`` behind forever; :func:`effective_status` tells such a
run from a live one, and ``kdbench gc`` cleans them up.

Live runs prove they are alive with a :class:`Heartbeat`::

    with Heartbeat(engine, writer.run_id, interval_s=30):
        ...train, evaluate...

It records ``host``, ``pid`` and ``heartbeat_at`` in the run row when it starts and refreshes
``heartbeat_at`` every ``interval_s`` seconds from a daemon thread (each beat its own short,
retried transaction; a failed beat is reported once on stderr and never disturbs the run).

:func:`effective_status` is a pure function of the row, ``now`` and a ``pid_alive`` check:

* not ``running``: the recorded status;
* ``running``, recorded on this host with a PID: ``interrupted`` as soon as that process is gone
  (or is a zombie), or when its heartbeat is older than ``stale_after_s`` (the PID was reused,
  or the process is hung);
* ``running`` on another host, or without host/PID: ``interrupted`` once the last sign of life
  (``heartbeat_at``, else ``created_at``) is older than ``stale_after_s``
  (default ``STALE_FACTOR`` × ``DEFAULT_INTERVAL_S`` = 300 s).

So a run is never shown ``running`` (or ``finished``) once its process is gone.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from kdbench.errors import UserError
from kdbench.store import (
    Run,
    delete_run_rows,
    in_transaction,
    retry_busy,
    utcnow,
    writing,
)

DEFAULT_INTERVAL_S = 30.0
STALE_FACTOR = 10
DEFAULT_STALE_AFTER_S = STALE_FACTOR * DEFAULT_INTERVAL_S

RUNNING, INTERRUPTED = "running", "interrupted"


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie (killed, not yet reaped)."""
    if pid is None or isinstance(pid, bool):
        return False
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, OSError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass  # no /proc (macOS): os.kill's answer stands
    return True


# ---------------------------------------------------------------------------- effective status


def _field(run: Any, name: str) -> Any:
    value = run.get(name) if isinstance(run, dict) or hasattr(run, "keys") else getattr(run, name, None)
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is not None and value != value:  # NaT
        return None
    return value


def _as_naive_utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        return None
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        value = value.to_pydatetime()
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def liveness(
    run: Any,
    now: dt.datetime | None = None,
    *,
    pid_alive: Callable[[int], bool] = pid_alive,
    host: str | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> tuple[str, str]:
    """``(effective status, why)`` for a run row (ORM object or mapping); see the module docstring."""
    status = _field(run, "status")
    if status != RUNNING:
        return status, f"recorded {status}"
    now = _as_naive_utc(now) or utcnow()
    host = this_host() if host is None else host
    run_host, pid = _field(run, "host"), _field(run, "pid")
    beat = _as_naive_utc(_field(run, "heartbeat_at"))
    last = beat or _as_naive_utc(_field(run, "created_at"))
    age = None if last is None else (now - last).total_seconds()
    stale = age is not None and age > stale_after_s
    if run_host is not None and pid is not None and run_host == host:
        if not pid_alive(int(pid)):
            return INTERRUPTED, f"process {pid} on {run_host} is gone"
        if beat is not None and stale:
            return INTERRUPTED, (f"process {pid} exists but the last heartbeat is {age:.0f}s old "
                                 f"(PID reused or process hung)")
        return RUNNING, f"process {pid} on {run_host} is alive"
    if stale:
        what = "heartbeat" if beat is not None else "sign of life (no heartbeat recorded)"
        where = f" on {run_host}" if run_host else ""
        return INTERRUPTED, f"last {what}{where} {age:.0f}s ago (> {stale_after_s:.0f}s)"
    return RUNNING, ("heartbeat " + (f"{age:.0f}s ago" if age is not None else "unknown"))


def effective_status(
    run: Any,
    now: dt.datetime | None = None,
    *,
    pid_alive: Callable[[int], bool] = pid_alive,
    host: str | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> str:
    """The status to show: the recorded one, except that a ``running`` run whose process is gone
    is ``interrupted``. Pure: depends only on the row, ``now`` (naive UTC, default: the current
    time), ``pid_alive`` and ``host`` (default: this machine's name)."""
    return liveness(run, now, pid_alive=pid_alive, host=host, stale_after_s=stale_after_s)[0]


# ---------------------------------------------------------------------------- one owner per run

RESUMABLE = (INTERRUPTED, "failed")


def claim_run(engine: Engine, run_id: int, *, host: str | None = None, pid: int | None = None,
              now: dt.datetime | None = None, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> dict:
    """Make this process (``host``, ``pid``: default this one) the owner of a run that may be
    resumed, atomically: the row is read and rewritten in one write transaction, so two claims
    never both succeed. Returns the fields it replaced (for :func:`release_run`). Refuses, with
    one line and nothing written, a run that is missing, finished or still owned by a live process."""
    host = host or this_host()
    pid = os.getpid() if pid is None else int(pid)

    def write(s: Session) -> dict:
        query = select(Run).where(Run.id == int(run_id))
        if s.get_bind().dialect.name != "sqlite":  # SQLite's BEGIN IMMEDIATE already serialises writers
            query = query.with_for_update()
        run = s.scalars(query).one_or_none()
        if run is None:
            raise UserError(f"no run {run_id} in the store")
        status, why = liveness(run, now, stale_after_s=stale_after_s)
        if status == RUNNING:
            raise UserError(f"run {run_id} is running ({why}); a run has one owner at a time: wait for it, "
                            f"or stop it and resume it then")
        if status not in RESUMABLE:
            raise UserError(f"run {run_id} is {status}; only interrupted (or failed) runs can be resumed")
        before = {k: getattr(run, k) for k in ("status", "error", "finished_at", "host", "pid", "heartbeat_at")}
        run.status, run.error, run.finished_at = RUNNING, None, None
        run.host, run.pid, run.heartbeat_at = host, pid, now or utcnow()
        return before

    return in_transaction(engine, write)


def release_run(engine: Engine, run_id: int, before: dict, owner: tuple[str, int]) -> bool:
    """Undo :func:`claim_run` when the resume stopped before it trained (the run is as it was,
    resumable again); only while ``owner`` still owns the run. True when it was restored."""
    def write(s: Session) -> bool:
        run = s.get(Run, int(run_id))
        if run is None or (run.host, run.pid) != tuple(owner):
            return False
        for k, v in before.items():
            setattr(run, k, v)
        return True

    return in_transaction(engine, write)


# ---------------------------------------------------------------------------- graceful stop


class GracefulStop:
    """SIGTERM during training: finish the step, checkpoint, then stop (``kdbench run --resume``
    continues). Armed by the run (kdbench/recipe.py) while it trains; the CLI's SIGTERM handler calls
    :meth:`request` and, when nothing is armed (or on a second signal), raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.armed = False
        self.requested = False

    def request(self) -> bool:
        """True when the stop was deferred to the end of the current step."""
        if self.armed and not self.requested:
            self.requested = True
            return True
        return False


GRACEFUL = GracefulStop()


# ---------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Proof of life for a run: ``with Heartbeat(engine, run_id, interval_s=30): ...``.

    ``start()`` writes host, PID and ``heartbeat_at`` synchronously (so the row identifies its
    process before any work starts), then a daemon thread refreshes ``heartbeat_at`` every
    ``interval_s`` seconds. ``stop()`` ends the thread promptly (it waits on an event, not a
    sleep) and joins it. The status is never touched here: the run finishes, fails or
    interrupts the run itself. With ``owned=True`` (the process already owns the row: it created
    or claimed it) every beat only touches a row that still names this host and PID; when one
    finds another owner, :attr:`lost` is set and the beats stop (the run checks it each step).
    """

    def __init__(self, engine: Engine, run_id: int, interval_s: float = DEFAULT_INTERVAL_S, *,
                 host: str | None = None, pid: int | None = None, owned: bool = False):
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self.engine = engine
        self.run_id = int(run_id)
        self.interval_s = float(interval_s)
        self.host = host or this_host()
        self.pid = os.getpid() if pid is None else int(pid)
        self.owned = owned
        self.lost = False
        self.beats = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def _write(self, **fields: Any) -> None:
        where = [Run.id == self.run_id]
        if self.owned:
            where += [Run.host == self.host, Run.pid == self.pid]

        def attempt():
            with writing(self.engine).begin() as conn:
                return conn.execute(update(Run.__table__).where(*where).values(**fields)).rowcount

        if retry_busy(attempt, budget_s=max(1.0, min(self.interval_s, 10.0))) == 0 and self.owned:
            self.lost = True
            self._stop.set()

    def beat(self) -> None:
        """One heartbeat now (the thread calls this every ``interval_s``)."""
        self._write(heartbeat_at=utcnow())
        self.beats += 1

    def start(self) -> "Heartbeat":
        if self._thread is not None:
            return self
        self._write(host=self.host, pid=self.pid, heartbeat_at=utcnow())
        self.beats += 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"kdbench-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as exc:  # a lost beat must never take the run down
                self.failures += 1
                if not self._warned:
                    self._warned = True
                    print(f"kdbench: warning: heartbeat of run {self.run_id} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)

    def stop(self, timeout: float | None = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------- gc


@dataclass
class Orphan:
    """A run ``kdbench gc`` would act on: a ``running`` row whose process is gone (``stale``), or
    one already recorded ``interrupted``."""

    run_id: int
    recorded: str
    reason: str
    role: str
    setting: str | None
    suite: str
    suite_version: str
    host: str | None
    pid: int | None
    heartbeat_at: dt.datetime | None
    created_at: dt.datetime | None
    state_path: str | None

    @property
    def stale(self) -> bool:
        return self.recorded == RUNNING


def _orphan(run: Run, reason: str) -> Orphan:
    return Orphan(run.id, run.status, reason, run.role, run.setting, run.suite, run.suite_version, run.host,
                  run.pid, run.heartbeat_at, run.created_at, run.state_path)


def find_orphans(engine: Engine, now: dt.datetime | None = None, *, include_recorded: bool = True,
                 **kw: Any) -> list[Orphan]:
    """Running rows whose process is gone, and (``include_recorded``) rows recorded ``interrupted``."""
    statuses = [RUNNING, INTERRUPTED] if include_recorded else [RUNNING]
    now = now or utcnow()
    with Session(engine) as s:
        runs = list(s.scalars(select(Run).where(Run.status.in_(statuses)).order_by(Run.id)))
        out = []
        for run in runs:
            status, why = liveness(run, now, **kw)
            if run.status == INTERRUPTED:
                out.append(_orphan(run, run.error or "recorded interrupted"))
            elif status == INTERRUPTED:
                out.append(_orphan(run, why))
        return out


def mark_interrupted(engine: Engine, run_ids: Iterable[int] | None = None, now: dt.datetime | None = None,
                     **kw: Any) -> list[int]:
    """Record ``interrupted`` for running rows whose process is gone (``run_ids``: only these).
    Liveness is re-checked inside the write transaction, so a run that beat meanwhile is left alone."""
    wanted = None if run_ids is None else {int(i) for i in run_ids}
    now = now or utcnow()

    def write(s: Session) -> list[int]:
        done = []
        for run in s.scalars(select(Run).where(Run.status == RUNNING).order_by(Run.id)):
            if wanted is not None and run.id not in wanted:
                continue
            status, why = liveness(run, now, **kw)
            if status == INTERRUPTED:
                run.status = INTERRUPTED
                run.finished_at = run.heartbeat_at or now
                run.error = f"interrupted: {why} (marked by kdbench gc at {now:%Y-%m-%d %H:%M:%S} UTC)"[:4000]
                done.append(run.id)
        return done

    return in_transaction(engine, write)


def delete_orphans(engine: Engine, orphans: Iterable[Orphan], now: dt.datetime | None = None,
                   **kw: Any) -> list[int]:
    """Delete these runs with all their rows (metrics, curves, samples, artifacts) in one
    transaction, each only if it is still an orphan (re-checked inside the transaction)."""
    listed = {o.run_id for o in orphans}
    now = now or utcnow()

    def write(s: Session) -> list[int]:
        if not listed:
            return []
        gone = []
        for run in s.scalars(select(Run).where(Run.id.in_(sorted(listed)))):
            if run.status == INTERRUPTED or (run.status == RUNNING and liveness(run, now, **kw)[0] == INTERRUPTED):
                gone.append(run.id)
        s.expunge_all()
        delete_run_rows(s, gone)
        return sorted(gone)

    return in_transaction(engine, write)
