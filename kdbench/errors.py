"""User-facing errors: the CLI prints ``kdbench: error: <message>`` and exits 2, no traceback."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A mistake in what the user asked for (bad name, bad parameter, unwritable store)."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], *, what: str) -> str:
    """'unknown objective 'csdd'; valid: csd, csd_ss, ... ' with the closest match first."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=len(choices), cutoff=0.0)
    ordered = close + [c for c in sorted(choices) if c not in close]
    hint = f" (did you mean {close[0]!r}?)" if close and difflib.SequenceMatcher(None, name, close[0]).ratio() > 0.6 else ""
    return f"unknown {what} {name!r}{hint}; valid choices: {', '.join(ordered)}"


class RunFailed(RuntimeError):
    """A recorded run failed; the message says why and which run id holds the reason."""
