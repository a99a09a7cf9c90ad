"""One run option, apart from the others: how a RunConfig field declares its flag
(:class:`Option`, :func:`option`) and how a value of it is read and checked, wherever it comes
from -- the command line (the argument types, which the other commands' numeric flags use too),
``--param key=value`` pairs, a sweep file's ``run:`` mapping, a job's JSON or a stored request.

Which options a run has, and what is built from all of them together (RunConfig, its JSON, its
command line, its key, its resolution), is kdbench/config.py's. Nothing here reads RunConfig, so
a field added to it (docs/engine.md "Adding a run option") needs no change here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from kdbench.errors import UserError

SEED_MAX = 2**32 - 1        # numpy / torch generators take 32-bit seeds
COUNT_MAX = 10**9           # steps, prompts, documents, batches: anything larger is a typo


# ---------------------------------------------------------------------------------------------
# Argument types: each checks a value before anything is opened (argparse types of the flags,
# and the same checks for values read from a sweep file or a job's configuration)
# ---------------------------------------------------------------------------------------------


def _int_in(flag: str, lo: int, hi: int):
    """An argparse type: an integer in [lo, hi], checked before anything is opened."""
    def parse(text: str) -> int:
        t = text.strip()
        if "_" in t:  # int("1_0") is 10: a digit separator is a typo more often than a number
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r} ('_' digit separators are "
                                             f"not accepted)")
        if not re.fullmatch(r"[+-]?\d+", t):  # \d: any Unicode digits, which int() reads
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}")
        v = int(t)
        if v < lo:
            raise argparse.ArgumentTypeError(f"{flag} must be at least {lo}, got {text}" if hi >= COUNT_MAX else
                                             f"{flag} must be in [{lo}, {hi}], got {text}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"{flag} must be at most {hi}, got {text}" if lo > 0 else
                                             f"{flag} must be in [{lo}, {hi}], got {text}")
        return v
    parse.__name__ = flag
    parse.bounds = (lo, hi)  # for the message on a value of the wrong kind (1.5 read from a file)
    return parse


def _nonempty(flag: str):
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} must not be empty")
        return text
    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        if "_" in text:  # float("1_0") is 10.0
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r} ('_' digit separators are not "
                                             f"accepted)")
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not (v > 0 and v < 1e6):
            raise argparse.ArgumentTypeError(f"{flag} must be a positive number, got {text}")
        return v
    return parse


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has it is
    kdbench/device.py ``resolve_device``'s to check)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid choices: auto, cpu, cuda, cuda:N")
    return text.strip()


def parse_params(pairs: list[str] | None) -> dict[str, str]:
    """``--param key=value`` (repeatable) → {key: "value"}; the registry coerces the types."""
    params: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"malformed --param {pair!r}; expected key=value, e.g. --param tau=1.5")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise UserError(f"malformed --param {pair!r}: {key.strip()!r} is not a parameter name")
        if key.strip() in params:
            raise UserError(f"--param {key.strip()!r} given twice")
        params[key.strip()] = value.strip()
    return params


# Option.type takes the name a message should give the value (the flag, or "sweep file s.yaml:
# run.steps") and returns the parser; these are the run options' types.
_seed = functools.partial(_int_in, lo=0, hi=SEED_MAX)
_count = functools.partial(_int_in, lo=1, hi=COUNT_MAX)


def _device_type(_name: str):
    return _device


# ---------------------------------------------------------------------------------------------
# An option's declaration: its flag, its type, its roles in a sweep, a run's identity and --resume
# ---------------------------------------------------------------------------------------------

COMMANDS = ("run", "prepare", "sweep")
#: What a sweep does with an option: "vary" -- the sweep's own grid key gives each job its value
#: (--objectives, --param, --suite, --seeds); "tune" -- a --tune grid, or one value for every job
#: in the file's run: mapping; "every" -- a flag of `kdbench sweep` (and a key of run:) passed to
#: every job; None -- not the sweep's to set per job (the store: the sweep's own --db; the
#: progress bar: jobs never draw one; the sweep id: the sweep's).
SWEEP_ROLES = ("vary", "tune", "every", None)
#: How an option enters the run's identity (run_key, runs.config_hash): "objective" -- through
#: the resolved objective (name, version, every parameter); "label" -- through the version label
#: resolve_suite makes (2+steps=3); "key" -- its value, under its name (always for the fields
#: of config._BASE_IDENTITY, e.g. suite and seed; any other only where it differs from its
#: default, so adding an option leaves every existing run's key unchanged); None --
#: provenance, not identity (device, teacher source, store, ...).
IDENTITY_ROLES = ("objective", "label", "key", None)


@dataclass(frozen=True)
class Option:
    """A RunConfig field's metadata (``field(metadata={"option": Option(...)})``, see :func:`option`)."""

    flag: str                                  # --steps; a bool option's flag turns its default over
    help: str                                  # --help's text; says the default
    type: Callable[[str], Callable[[str], Any]] | None = None  # name -> argparse type (checks the value)
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    commands: tuple[str, ...] = COMMANDS       # the commands that take it
    sweep: str | None = "every"                # SWEEP_ROLES
    identity: str | None = None                # IDENTITY_ROLES
    resume: bool = False                       # `--resume` takes it: it belongs to the command, not the
    #                                            run (so it is not stored in the run's request either)
    canonical: Callable[[Any], Any] | None = None  # the value as the run key holds it, where two spellings
    #                                            are one experiment (--sampler gkd == gkd(lmbda=0.5))
    # Filled in by options() from the field:
    name: str = ""
    default: Any = None
    kind: type = str                           # str, int, float, bool or dict (the field's type, None aside)

    @property
    def key(self) -> str:
        """The flag's name as argparse's dest and as a sweep file's ``run:`` key (``no_save``)."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def negated(self) -> bool:
        """A flag that turns a True default off (``--no-save``: save_student=False)."""
        return self.kind is bool and self.default is True

    def field_value(self, flag_value):
        """The field's value from the flag's (True for a given switch, the list of --param items)."""
        if self.kind is bool:
            return not flag_value if self.negated else bool(flag_value)
        if self.kind is dict:
            return parse_params(flag_value)
        return flag_value

    def argv(self, value, *, always: bool = False) -> list[str]:
        """The flag and value that give the field ``value`` (nothing for the default, unless ``always``)."""
        if value is None or (value == self.default and not (always and self.kind is not bool)):
            return []
        if self.kind is bool:
            return [self.flag] if value != self.default else []
        if self.kind is dict:
            return [w for k, v in value.items() for w in (self.flag, f"{k}={v}")]
        return [self.flag, str(value)]


def option(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **meta):
    """A RunConfig field: ``option(default, flag=..., help=..., ...)`` (the rest is :class:`Option`)."""
    return field(default=default, default_factory=default_factory, metadata={"option": Option(**meta)})


# ---------------------------------------------------------------------------------------------
# A value read from a file (a sweep file's run: mapping) or JSON (a job's configuration, a
# stored request), checked as strictly as its flag reads it
# ---------------------------------------------------------------------------------------------


def _parsed(o: Option, text: str, where: str):
    try:
        return o.type(where)(text)
    except argparse.ArgumentTypeError as exc:
        msg = str(exc)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def flag_value(o: Option, value, where: str):
    """A flag's value read from a file (YAML, JSON), checked as strictly as the flag reads it;
    ``where`` names it in the one-line refusal (``sweep file s.yaml: run.steps``)."""
    if o.kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} is a flag: true or false, got {value!r}")
        return value
    if o.kind is dict:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} must be a list of key=value strings, got {value!r}")
        return value
    if o.kind is int and (isinstance(value, bool) or not isinstance(value, (int, str))):
        lo, hi = getattr(o.type(where), "bounds", (None, None))
        rng = f" in [{lo}, {hi}]" if lo is not None else ""
        raise UserError(f"{where} must be an integer{rng}, got {value!r}")
    if o.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise UserError(f"{where} must be a positive number, got {value!r}")
    if o.kind is str and (not isinstance(value, str) or not value.strip()):
        raise UserError(f"{where} must be a name or a path (a string), got {value!r}")
    if o.choices is not None and value not in o.choices:
        raise UserError(f"{where}: unknown value {value!r}; valid choices: {', '.join(o.choices)}")
    return _parsed(o, str(value), where) if o.type else value


def json_value(o: Option, value, where: str):
    """A field's value read from JSON (a job's configuration, a stored request), checked."""
    if value is None and o.default is None:
        return None
    if o.kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                                  and not isinstance(v, bool) for k, v in value.items()):
            raise UserError(f"{where} must be a mapping of parameter names to values, got {value!r}")
        return dict(value)
    return flag_value(o, value, where)
