"""Short write transactions: ``BEGIN IMMEDIATE`` on SQLite (:func:`writing`), retried as a
whole with exponential backoff and jitter on busy/locked errors (:func:`in_transaction`)."""

from __future__ import annotations

import random
import sqlite3
import time
from typing import Callable, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from kdbench.store.models import IMMEDIATE_OPTION, RETRY_BUDGET_S

T = TypeVar("T")

def writing(engine: Engine) -> Engine:
    """The engine for one of kdbench's write transactions (SQLite: ``BEGIN IMMEDIATE``)."""
    return engine.execution_options(**{IMMEDIATE_OPTION: True})


def is_busy_error(exc: BaseException) -> bool:
    """SQLite busy/locked (and PostgreSQL serialization/deadlock) errors: retrying can succeed."""
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, sqlite3.OperationalError):
        msg = str(orig).lower()
        return "locked" in msg or "busy" in msg
    return getattr(orig, "pgcode", None) in ("40001", "40P01")


def retry_busy(fn: Callable[[], T], *, budget_s: float = RETRY_BUDGET_S) -> T:
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
    return retry_busy(attempt)
