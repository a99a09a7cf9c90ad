"""Helpers shared by the store's tests (test_store_reliability.py, test_store_lifecycle.py): small stores,
byte digests, read-only counts and the CLI with its one-line errors."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import sys
from pathlib import Path

from kdbench.cli import main
from kdbench.store import RunWriter, open_engine

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "MKL_NUM_THREADS": "1"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_run(engine, **kw):
    return RunWriter.start(engine, role="distilled", suite="micro", suite_version="1", seed=kw.pop("seed", 0),
                           config={}, provenance={}, objective="kl", params={}, setting="kl", **kw)


def new_store(path: Path, n_runs: int = 1) -> Path:
    engine = open_engine(str(path))
    for i in range(n_runs):
        w = start_run(engine, seed=i)
        w.metrics([("chatterbot", "rougeL", 10.0 + i, 10)])
        w.finish()
    engine.dispose()
    checkpoint(path)
    return path


def checkpoint(path: Path) -> None:
    """Fold the -wal into the file so byte comparisons see every row."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def count(path: Path, sql: str):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def cli(capsys, *args, stdin: str | None = None, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdbench: error:") and "Traceback" not in err, err
    return lines[0]


def store_location(folder: Path, name: str = "runs.db") -> str:
    """Where a results-layer fixture store is built: a SQLite file in ``folder`` (what the suite and
    CI use), or, when ``KDBENCH_TEST_STORE_URL`` names a PostgreSQL server
    (``postgresql+psycopg://user:password@host/database``, a user allowed to create databases), a
    new database on it, dropped when the tests end: the same tests then check the queries on
    PostgreSQL, which is stricter than SQLite (GROUP BY, column lengths). docs/store.md says how."""
    url = os.environ.get("KDBENCH_TEST_STORE_URL")
    if not url:
        return str(folder / name)
    import atexit
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(url)
    db = f"kdbench_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))

    def drop():
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
    atexit.register(drop)
    return server.set(database=db).render_as_string(hide_password=False)


def distilled_run(db: Path) -> dict:
    """The store's one distilled run, as the tests that run whole ``kdbench`` processes compare
    them: status, error, id, config, selected step, sorted metrics and samples, curve points
    ``(split, step, loss)`` in the order written."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from kdbench.store import CurvePoint, Metric, Run, Sample

    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        runs = s.scalars(select(Run).where(Run.role == "distilled")).all()
        assert len(runs) == 1, [(r.id, r.status) for r in runs]
        run = runs[0]
        metrics = sorted((m.task, m.metric, m.seed, m.value) for m in s.scalars(select(Metric).where(Metric.run_id == run.id)))
        samples = sorted((x.prompt_id, x.seed, x.output) for x in s.scalars(select(Sample).where(Sample.run_id == run.id)))
        curve = [(c.split, c.step, c.loss) for c in s.scalars(select(CurvePoint).where(CurvePoint.run_id == run.id))]
        out = {"status": run.status, "error": run.error, "id": run.id, "config": run.config, "metrics": metrics,
               "samples": samples, "curve": curve, "selected_step": run.selected_step}
    engine.dispose()
    return out
