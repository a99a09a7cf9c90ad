"""Passwords in store URLs are never printed, stored or logged, in every form a URL can hold one:
user-info passwords with any characters (a raw ``@`` included), ``?password=`` and other secret
query parameters. Unit checks of the one redaction (kdbench/secrets.py), then real commands —
a run and a sweep on a SQLite store whose URL carries a password, ``sweep --dry-run`` with each
PostgreSQL form — whose every printed line, stored row and log file is searched for the secret.
The failing-store forms (a closed PostgreSQL port, a bad scheme) are in the bad-input corpus."""

from __future__ import annotations

import json
import os
import sqlite3
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


def test_a_raw_at_in_the_password_opens_the_host_meant():
    url = parse_url(f"postgresql+psycopg://ana:p@ss@db.lab:5432/kd")
    assert (url.password, url.host, url.port) == ("p@ss", "db.lab", 5432)


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
        from tests.tiny_models import make_tiny_pair
    except ImportError:
        from tiny_models import make_tiny_pair
    tmp = tmp_path_factory.mktemp("secrets")
    teacher, student = make_tiny_pair(tmp / "models")
    data = tmp / "data" / "gsm8k"
    data.mkdir(parents=True)
    for name, n in (("train", 24), ("test", 2)):
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(n)))
    common = ["--suite", "paper-task-gsm8k", "--teacher", str(teacher), "--teacher-finetuned", "--student",
              str(student), "--data-dir", str(tmp / "data"), "--steps", "1", "--eval-limit", "1", "--no-save"]
    return {"tmp": tmp, "common": common}


def _everything_in(db: Path) -> str:
    """Every value of every row of every table of a SQLite store, as text."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    text = "\n".join(repr(row) for t in tables for row in con.execute(f"SELECT * FROM {t}"))
    con.close()
    return text


def _files_under(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.suffix in (
        ".log", ".json", ".txt", ".yaml"))


def test_a_run_and_a_sweep_on_a_store_url_with_a_password_keep_it_nowhere(tiny):
    """A SQLite store named with ``?password=`` (SQLite ignores it, kdbench must still hide it):
    a real run and a real one-job sweep; their output, every stored row, the sweep's logs and
    the run's provenance hold no password."""
    tmp, cache = tiny["tmp"], tiny["tmp"] / "cache"
    db = tmp / "runs.db"
    url = f"sqlite:///{db}?password={PW}"
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
    stored = _everything_in(db)
    assert stored.count("'finished'") >= 3 + 1  # the run, its two reference rows and the sweep's run
    for where, text in (("run output", run.stdout + run.stderr), ("sweep output", sweep.stdout + sweep.stderr),
                        ("stored rows", stored), ("logs", _files_under(cache))):
        assert PW not in text, f"the password is in the {where}"
    argvs = [json.loads(p)["argv"] for (p,) in sqlite3.connect(db).execute(
        "SELECT provenance FROM runs WHERE role = 'distilled'")]
    assert any("password=***" in " ".join(a) for a in argvs)  # the run named the store: masked
    assert any("--db" not in a for a in argvs)  # the sweep's jobs were handed the store in $KDBENCH_DB
