"""User-facing errors: the CLI prints ``kdbench: error: <message>`` and exits 2, no traceback."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A mistake in what the user asked for (bad name, bad parameter, unwritable store)."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], *, what: str) -> str:
    """'unknown objective 'csdd' (did you mean 'csd'?); valid choices: csd, csd_ss, ...' with the
    closest match first. Case is ignored when matching: 'KL' suggests 'kl'."""
    choices = list(dict.fromkeys(choices))
    key = str(name).lower()
    exact = [c for c in choices if c.lower() == key]
    by_lower: dict[str, list[str]] = {}
    for c in choices:
        by_lower.setdefault(c.lower(), []).append(c)
    close = [c for low in difflib.get_close_matches(key, list(by_lower), n=len(by_lower), cutoff=0.0)
             for c in by_lower[low]]
    close = exact + [c for c in close if c not in exact]
    ordered = close + [c for c in sorted(choices) if c not in close]
    hint = ""
    if exact:
        hint = f" (did you mean {exact[0]!r}?)"
    elif close and difflib.SequenceMatcher(None, key, close[0].lower()).ratio() > 0.6:
        hint = f" (did you mean {close[0]!r}?)"
    return f"unknown {what} {name!r}{hint}; valid choices: {', '.join(ordered)}"


class RunFailed(RuntimeError):
    """A recorded run failed; the message says why and which run id holds the reason."""


class KdbenchWarning(UserWarning):
    """Something the user should know that does not stop the command (e.g. a broken plug-in that
    the command does not use); the CLI prints it as one ``kdbench: warning: ...`` line."""
