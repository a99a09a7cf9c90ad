"""Passwords in store URLs are never printed, stored or logged, in every form a URL can hold one:
user-info passwords with any characters (a raw ``@`` included), ``?password=`` and other secret
query parameters. Unit checks of the one redaction (kdbench/secrets.py), then real commands —
a run and a sweep on a SQLite store whose URL carries a password, ``sweep --dry-run`` with each
PostgreSQL form — whose every printed line, stored row and log file is searched for the secret.
The failing-store forms (a closed PostgreSQL port, a bad scheme) are in the bad-input corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.secrets import parse_url, redact_url, redact_word

ROOT = Path(__file__).resolve().parent.parent
PW = "Zq7-pw!x"   # in every URL below; must never be seen again
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
ENV.pop("KDBENCH_DB", None)

PG_FORMS = [
    f"postgresql+psycopg://ana:{PW}@db.lab:5432/kd",
    f"postgresql+psycopg://ana:{PW}@x@db.lab:5432/kd",          # a raw '@' inside the password
    f"postgresql+psycopg://ana:{PW.replace('!', '%21')}@db.lab/kd",  # percent-encoded
    f"postgresql+psycopg://ana@db.lab/kd?password={PW}",
    f"postgresql+psycopg://ana:{PW}@db.lab/kd?sslmode=require&sslpassword={PW}",
    f"postgresql://ana@db.lab/kd?application_name=kdbench&password={PW}",
    f"mysql+pymysql://ana:{PW}:{PW}@db.lab/kd",
]


@pytest.mark.parametrize("url", PG_FORMS)
def test_every_url_form_is_masked_and_keeps_the_rest(url):
    shown = redact_url(url)
    assert PW not in shown and PW.replace("!", "%21") not in shown and "***" in shown
    assert "db.lab" in shown and "/kd" in shown and shown.split("://")[0] == url.split("://")[0]
    assert redact_word(f"--db={url}") == f"--db={shown}"


@pytest.mark.parametrize("text, password, host, port, database, query", [
    ("postgresql+psycopg://ana:p@ss@db.lab:5432/kd", "p@ss", "db.lab", 5432, "kd", {}),
    ("postgresql+psycopg://ana:P@ss:w0rd/x@127.0.0.1:55432/kd", "P@ss:w0rd/x", "127.0.0.1", 55432, "kd", {}),
    ("postgresql://ana:p?w#d@db.lab/kd", "p?w#d", "db.lab", None, "kd", {}),
    ("postgresql://ana:pw@db.lab/kd?application_name=a@b", "pw", "db.lab", None, "kd", {"application_name": "a@b"}),
    ("postgresql://ana:a%40b@db.lab/kd", "a@b", "db.lab", None, "kd", {}),
    ("postgresql://:pw@db.lab/kd", "pw", "db.lab", None, "kd", {}),
    ("postgresql://db.lab/kd@x", None, "db.lab", None, "kd@x", {}),
    ("postgresql://ana:pw@[::1]:5432/kd", "pw", "::1", 5432, "kd", {}),
])
def test_a_password_with_any_characters_opens_the_host_meant(text, password, host, port, database, query):
    """SQLAlchemy's own parser ends a password at its first raw '@' (``ana:p@ss@db.lab`` would
    connect to host ``ss@db.lab`` and show ``ss`` in every message)."""
    url = parse_url(text)
    assert (url.password, url.host, url.port, url.database, dict(url.query)) == (password, host, port, database, query)
    if password:
        assert password not in redact_url(text)


def test_text_without_a_secret_is_kept_exactly():
    for word in ["sqlite:////tmp/a@b.db", "runs.db", "postgresql://ana@db/kd", "https://example.org/x:y?page=2"]:
        assert redact_word(word) == word


def test_dry_run_never_prints_a_password_and_says_where_it_goes(capsys):
    from kdbench.cli import main

    for url in PG_FORMS:
        assert main(["sweep", "--objectives", "kl", "ce", "--seeds", "0", "1", "--dry-run", "--db", url]) == 0
        out = capsys.readouterr().out
        assert PW not in out and PW.replace("!", "%21") not in out
        assert "KDBENCH_DB" in out and "***" in out
        commands = [ln for ln in out.splitlines() if ln.startswith("kdbench run")]
        assert len(commands) == 4 and not any("--db" in c for c in commands)  # the jobs read $KDBENCH_DB
    assert main(["sweep", "--objectives", "kl", "--dry-run", "--db", "plain.db"]) == 0
    assert "--db plain.db" in capsys.readouterr().out  # no password: named as given


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    try:
        from tests.tiny_models import make_tiny_gsm8k
    except ImportError:
        from tiny_models import make_tiny_gsm8k
    tmp = tmp_path_factory.mktemp("secrets")
    teacher, student, data_root = make_tiny_gsm8k(tmp)
    common = ["--suite", "paper-task-gsm8k", "--teacher", str(teacher), "--teacher-finetuned", "--student",
              str(student), "--data-dir", str(data_root), "--steps", "1", "--eval-limit", "1", "--no-save"]
    return {"tmp": tmp, "common": common}


def _everything_in(url: str) -> str:
    """Every value of every row of every table of a store, as text."""
    from sqlalchemy import MetaData, create_engine, select

    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as c:
        text = "\n".join(repr(tuple(row)) for table in meta.sorted_tables for row in c.execute(select(table)))
    engine.dispose()
    return text


def _files_under(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.suffix in (
        ".log", ".json", ".txt", ".yaml"))


@pytest.fixture(params=["sqlite", "postgresql"])
def secret_store(request, tiny):
    """(store URL with a password, the password, a plain URL to read it back): a SQLite file named
    with ``?password=`` (SQLite ignores it; kdbench must still hide it), or, where the server
    tests run (``KDBENCH_TEST_STORE_URL``, tests/store_helpers.py), a new PostgreSQL database
    reached with the server user's real password."""
    if request.param == "sqlite":
        db = tiny["tmp"] / "runs.db"
        return f"sqlite:///{db}?password={PW}", PW, f"sqlite:///{db}"
    if not os.environ.get("KDBENCH_TEST_STORE_URL"):
        pytest.skip("no PostgreSQL server (KDBENCH_TEST_STORE_URL); the SQLite case runs everywhere")
    try:
        from tests.store_helpers import store_location
    except ImportError:
        from store_helpers import store_location
    url = store_location(tiny["tmp"])
    password = parse_url(url).password
    assert password, "KDBENCH_TEST_STORE_URL needs a user with a password for this test"
    return url, password, url


def test_a_run_and_a_sweep_on_a_store_url_with_a_password_keep_it_nowhere(tiny, secret_store):
    """A real run and a real one-job sweep on a store whose URL carries a password: their output,
    every stored row, the sweep's logs and the runs' provenance hold no password."""
    url, secret, plain = secret_store
    cache = tiny["tmp"] / f"cache-{plain.split(':')[0]}"
    env = {**ENV, "KDBENCH_CACHE": str(cache)}
    run = subprocess.run([sys.executable, "-m", "kdbench", "run", "--objective", "kl", *tiny["common"], "--db", url,
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    sweep = subprocess.run([sys.executable, "-m", "kdbench", "sweep", "--objectives", "ce", "--seeds", "1",
                            "--suite", "paper-task-gsm8k", "--teacher", tiny["common"][3], "--teacher-finetuned",
                            "--student", tiny["common"][6], "--data-dir", tiny["common"][8], "--steps", "1",
                            "--eval-limit", "1", "--no-save", "--db", url], env=env, capture_output=True, text=True,
                           timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    stored = _everything_in(plain)
    assert stored.count("'finished'") >= 3 + 1  # the run, its two reference rows and the sweep's run
    import urllib.parse

    for where, text in (("run output", run.stdout + run.stderr), ("sweep output", sweep.stdout + sweep.stderr),
                        ("stored rows", stored), ("logs", _files_under(cache))):
        for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}:
            assert form not in text, f"the password is in the {where}"
    from sqlalchemy import create_engine, text as sql

    engine = create_engine(plain)
    with engine.connect() as c:
        argvs = [json.loads(p) if isinstance(p, str) else p
                 for (p,) in c.execute(sql("SELECT provenance FROM runs WHERE role = 'distilled'"))]
    engine.dispose()
    argvs = [p["argv"] for p in argvs]
    assert any("***" in " ".join(a) for a in argvs)  # the run named the store: masked
    assert any("--db" not in a for a in argvs)  # the sweep's job was handed the store in $KDBENCH_DB
