"""Provenance is stored in every run's row, and a team store is read by the whole team: a
password given on the command line (``--db postgresql+psycopg://user:password@host/db``) must
not be in it."""

from kdbench import provenance
from kdbench.secrets import redact_word


def test_argv_keeps_everything_but_url_passwords():
    argv = ["kdbench", "run", "--objective", "csd", "--db", "postgresql+psycopg://ana:s3cr@t@db.lab:5432/kd",
            "--param", "tau=1.5", "sqlite:////tmp/runs.db", "mysql://bo:p%40ss@h/d?charset=utf8"]
    got = provenance.collect(argv)["argv"]
    assert got == ["kdbench", "run", "--objective", "csd", "--db", "postgresql+psycopg://ana:***@db.lab:5432/kd",
                   "--param", "tau=1.5", "sqlite:////tmp/runs.db", "mysql://bo:***@h/d?charset=utf8"]


def test_words_that_only_look_like_urls_are_kept():
    for word in ["postgresql://ana@db/kd", "a:b@c", "user@host:path", "--db=runs.db", "https://example.org/x:y"]:
        assert redact_word(word) == word
