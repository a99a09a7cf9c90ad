"""Where a store is: any spelling of a location (a path, ``$KDBENCH_DB``, a SQLAlchemy URL) as
a :class:`Location`, with the name messages show (never a password)."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.secrets import parse_url, redact_url, redact_word
from kdbench.store.models import DB_ENV_VAR, DEFAULT_DB, StoreError


def resolve_url(db: str | None) -> str:
    """A path, a SQLAlchemy URL, or None (``$KDBENCH_DB``, else ``runs.db`` in the cwd)."""
    db = db or os.environ.get(DB_ENV_VAR) or DEFAULT_DB
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


@dataclass(frozen=True)
class Location:
    """Where a store lives: ``url`` (parsed), ``path`` for a SQLite file (None: in memory or
    another database), ``display`` for messages (SQLite: the path; else the URL, no password)."""

    url: Any
    path: Path | None
    memory: bool
    display: str

    @property
    def sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"


def locate(db: str | None) -> Location:
    """Parse any spelling of a store location (``sqlite:///``, ``sqlite+pysqlite:///``, with or
    without a query string, ``file:`` URIs with ``uri=true``, other SQLAlchemy URLs)."""
    raw = resolve_url(db)
    try:
        url = parse_url(raw)
    except Exception as exc:  # ArgumentError and friends: not a URL at all
        raise StoreError(f"cannot open run store {redact_url(raw)!r}: not a path or a SQLAlchemy URL "
                         f"({first_line(exc)})") from None
    if url.get_backend_name() != "sqlite":
        return Location(url, None, False, redact_url(url))
    database = url.database or ""
    query = {k: (v if isinstance(v, str) else v[-1]) for k, v in url.query.items()}
    if query.get("uri", "").lower() in ("true", "1"):
        rest = database[len("file:"):] if database.startswith("file:") else database
        rest, _, uri_query = rest.partition("?")
        if not rest or rest == ":memory:" or "mode=memory" in uri_query or query.get("mode") == "memory":
            return Location(url, None, True, redact_url(raw))
        path = Path(urllib.parse.unquote(rest)).expanduser().resolve()
    elif not database or database == ":memory:":
        return Location(url, None, True, redact_url(raw))
    else:
        path = Path(database).expanduser().resolve()
        url = url.set(database=str(path))
    return Location(url, path, False, str(path))


def first_line(exc: BaseException) -> str:
    """An error's first line, with any URL in it redacted (drivers may quote the URL they were given)."""
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return " ".join(redact_word(w) for w in (text_.splitlines() or [type(exc).__name__])[0].split(" "))
