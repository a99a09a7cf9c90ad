"""Secrets never printed, stored or logged: passwords in store URLs.

A team store is named by a URL such as ``postgresql+psycopg://user:PW@host/db``; the URL reaches
messages, a run's provenance (every row of a store the whole team reads), sweep command lines
and log files. Everything that shows or keeps a URL goes through :func:`redact_url` (one URL)
or :func:`redact_word` (a command-line word that may hold one), so there is one rule:

* the user-info password, whatever characters it holds — SQLAlchemy's parser stops a password
  at its first raw ``@`` (``user:p@ss@host`` reads as password ``p``, host ``ss@host``);
  :func:`parse_url` moves the rest back into the password, so the store opens the host the
  user meant and the whole password is hidden;
* query parameters that carry credentials (``?password=``, ``sslpassword``, tokens, secrets).

Each is replaced by ``***``. Nothing here imports the rest of kdbench.
"""

from __future__ import annotations

import re
import urllib.parse

from sqlalchemy.engine import URL, make_url

MASK = "***"

#: Query parameters whose values are credentials (compared lower-cased; any key containing
#: "password", "secret" or "token" counts too).
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword", "api_key", "apikey", "auth",
                               "credentials", "private_key"})


def is_secret_key(key: str) -> bool:
    k = key.lower()
    return k in SECRET_QUERY_KEYS or any(part in k for part in ("password", "secret", "token"))


_QUERY_START = re.compile(r"\?[A-Za-z_][A-Za-z0-9_]*=")  # "?name=" in a would-be password: a query, not a password
_AUTHORITY_REST = re.compile(r"(\[[^\]/]*\]|[^:/?#@\[\]]*)(:\d*)?(/[^?#]*)?(\?[^#]*)?")


def parse_url(text: str) -> URL:
    """``make_url(text)``, with a password holding raw ``@`` (or ``:``, ``/``) characters read
    whole. SQLAlchemy's parser ends the user-info at the first ``@``: ``user:p@ss:w/x@host/db``
    would be password ``p``, host ``ss``, port ``w``. Here the user-info ends at the last ``@``
    after which a plain ``host[:port][/database][?query]`` follows (a user name holds no ``/``
    or ``?``, and ``?name=`` starts the query, not a password). Raises what ``make_url`` raises for text that is not a URL."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", text, re.S)
    if m and not m.group(2).startswith("/"):
        scheme, rest = m.groups()
        for at in [i for i, c in enumerate(rest) if c == "@"][::-1]:
            user, sep, password = rest[:at].partition(":")
            if "/" in user or "?" in user or _QUERY_START.search(password) \
                    or not _AUTHORITY_REST.fullmatch(rest[at + 1:]):
                continue
            url = make_url(f"{scheme}://{rest[at + 1:]}")
            return url.set(username=urllib.parse.unquote(user) if user or sep else None,
                           password=urllib.parse.unquote(password) if sep else None)
    return make_url(text)


def secret_parts(url: URL) -> bool:
    """Whether ``url`` holds anything :func:`redact_url` would hide."""
    return url.password is not None or any(is_secret_key(k) for k in url.query)


def redact_url(url: URL | str) -> str:
    """The URL as text with its password and secret query values replaced by ``***``."""
    if isinstance(url, str):
        text = url
        try:
            url = parse_url(text)
        except Exception:  # not a URL SQLAlchemy reads: hide everything that could be user-info
            return _redact_unparsed(text)
        if not secret_parts(url):
            return text  # as the user wrote it (rendering would re-quote a path's characters)
    if url.password is not None:
        url = url.set(password=MASK)
    hidden = {k: MASK for k in url.query if is_secret_key(k)}
    if hidden:
        url = url.update_query_dict(hidden)
    # The mask stays readable (render_as_string would percent-encode it in the query).
    return url.render_as_string(hide_password=False).replace("%2A%2A%2A", MASK)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_SECRET = re.compile(r"([?&;]([^=&;#]*)=)([^&;#]*)")


def _redact_unparsed(text: str) -> str:
    """Fallback for text with ``scheme://`` that SQLAlchemy cannot parse: everything between the
    scheme and the last ``@`` of the authority is masked, and secret query values."""
    m = _SCHEME.search(text)
    if m is None:
        return text
    head, rest = text[: m.end()], text[m.end():]
    if "@" in rest and not rest.startswith("/"):
        user_info, _, after = rest.rpartition("@")
        user = user_info.split(":", 1)[0] if ":" in user_info else ""
        rest = (f"{user}:{MASK}" if ":" in user_info else MASK) + "@" + after
    rest = _QUERY_SECRET.sub(lambda q: q.group(1) + (MASK if is_secret_key(q.group(2)) else q.group(3)), rest)
    return head + rest


def redact_word(word: str) -> str:
    """A command-line word with any URL in it redacted (``--db=URL`` as well as a bare URL)."""
    m = _SCHEME.search(word)
    if m is None:
        return word
    return word[: m.start()] + redact_url(word[m.start():])
