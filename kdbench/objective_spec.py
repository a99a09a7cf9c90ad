"""Objective declarations as data: parameters, their coercion, and canonical setting strings.

:class:`ParamSpec` (alias :data:`Param`) declares one parameter and turns Python values or CLI
strings into checked values; :class:`ObjectiveSpec` is what ``@objective`` records about an
objective; :func:`parse_setting` / :func:`format_setting` read and write the canonical
``name(key=value,...)`` strings and :func:`resolve_params` fills in defaults. Nothing here knows
about discovery or the registry's state (:mod:`kdbench.registry`), nor runs an objective
(:mod:`kdbench.objective`).
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from kdbench.errors import UserError, did_you_mean

BUILTIN_PACKAGE = "kdbench.objectives"
PARAM_TYPES = ("float", "int", "bool", "str", "choice")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ObjectiveError(UserError, ValueError):
    """Unknown objective, bad parameter, duplicate or broken declaration (a ValueError)."""


# ---------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def _type_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    return {float: "float", int: "int", bool: "bool", str: "str"}.get(t, repr(t))


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: ``type`` is float | int | bool | str | choice.

    ``choices`` makes it a choice (of strings). ``min``/``max`` bound numbers (inclusive unless
    ``min_exclusive``/``max_exclusive``); ``also`` lists single values accepted outside them (an
    exact limit case: jsd's β = 0 is forward KL, while β in (0, 1e-30) is refused). Numbers given
    as strings are read strictly: no ``_`` digit separators (``1_5`` is refused, not read as 15);
    other Unicode digits (``１.５``) are read as Python reads them. ``active(params) -> bool`` says
    whether the value matters for the resolved parameters; inactive ones are left out of the
    setting string (e.g. CSD's ``alpha`` is only used by the ``mix`` weighting).
    """

    name: str
    type: str
    default: Any
    choices: tuple[str, ...] | None = None
    doc: str = ""
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    also: tuple[float, ...] = ()
    active: Callable[[dict], bool] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        t = _type_name(self.type)
        if self.choices is not None:
            if t not in ("choice", "str"):
                raise ObjectiveError(f"parameter {self.name!r}: choices need type 'choice', got {t!r}")
            choices = tuple(str(c) for c in self.choices)
            if not choices:
                raise ObjectiveError(f"parameter {self.name!r}: empty choices")
            object.__setattr__(self, "choices", choices)
            t = "choice"
        if t not in PARAM_TYPES:
            raise ObjectiveError(f"parameter {self.name!r}: type must be one of {', '.join(PARAM_TYPES)}, got {t!r}")
        if t == "choice" and self.choices is None:
            raise ObjectiveError(f"parameter {self.name!r}: type 'choice' needs choices")
        if not _NAME_RE.match(self.name):
            raise ObjectiveError(f"parameter name {self.name!r} must be an identifier")
        object.__setattr__(self, "type", t)
        object.__setattr__(self, "also", tuple(self.also))
        object.__setattr__(self, "default", self.coerce(self.default, owner="default of"))

    # -- values -----------------------------------------------------------------------------
    def range_text(self) -> str:
        if self.min is None and self.max is None:
            return ""
        lo = "(" if self.min_exclusive or self.min is None else "["
        hi = ")" if self.max_exclusive or self.max is None else "]"
        a = "-inf" if self.min is None else _fmt(self.min)
        b = "inf" if self.max is None else _fmt(self.max)
        singles = "".join(f"{{{_fmt(v)}}} ∪ " for v in self.also)
        return f"{singles}{lo}{a}, {b}{hi}"

    def describe(self) -> str:
        """'tau: float > 0 = 1.0' style text used in errors and the catalogue."""
        if self.type == "choice":
            return f"{self.name} ∈ {{{', '.join(self.choices)}}} = {_fmt(self.default)}"
        rng = self.range_text()
        return f"{self.name}: {self.type}{' in ' + rng if rng else ''} = {_fmt(self.default)}"

    def coerce(self, value: Any, owner: str = "") -> Any:
        """Validate/convert a Python value or a CLI string; ObjectiveError if it does not fit."""
        where = f"{owner} parameter {self.name!r}".strip()
        t = self.type
        if t == "choice":
            v = str(value) if not isinstance(value, bool) else None
            if v in self.choices:
                return v
            if v is not None:
                folded = [c for c in self.choices if c.lower() == v.strip().lower()]
                if len(folded) == 1:
                    return folded[0]
            raise ObjectiveError(did_you_mean(str(value), list(self.choices), what=f"value for {where}"))
        if t == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ObjectiveError(f"{where} expects a bool (true/false), got {value!r}")
        if t == "str":
            if not isinstance(value, str):
                raise ObjectiveError(f"{where} expects a string, got {value!r}")
            return value
        # numbers
        if isinstance(value, bool):
            raise ObjectiveError(f"{where} expects a {t}, got {value!r}")
        if isinstance(value, str) and "_" in value:
            # float("1_5") is 15.0: a typo for 1.5 (or 1,5) must not train at tau=15
            raise ObjectiveError(f"{where} expects a {t}, got {value!r}: '_' digit separators are not accepted "
                                 f"(write the number without them)")
        try:
            if isinstance(value, str):
                num = float(value.strip()) if t == "float" else _parse_int(value)
            elif t == "float":
                if not isinstance(value, (int, float)) and not (isinstance(value, Tensor) and value.numel() == 1):
                    raise TypeError
                num = float(value)
            else:
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if not isinstance(value, int):
                    raise TypeError
                num = int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400) from YAML
            rng = self.range_text()
            raise ObjectiveError(f"{where} expects a {t}{' in ' + rng if rng else ''}, got {value!r}") from None
        if isinstance(num, float) and not math.isfinite(num):
            raise ObjectiveError(f"{where} must be finite, got {value!r}")
        if num in self.also:
            return num
        bad = (
            (self.min is not None and (num < self.min or (self.min_exclusive and num == self.min)))
            or (self.max is not None and (num > self.max or (self.max_exclusive and num == self.max)))
        )
        if bad:
            raise ObjectiveError(f"{where} must be in {self.range_text()}, got {value!r}")
        return num


Param = ParamSpec
"""Short name for declaring parameters: ``Param("tau", float, 1.0, doc=..., min=0, min_exclusive=True)``."""


def _parse_int(text: str) -> int:
    """An integer from a string: ``12``, ``１２`` (any Unicode digits), or an integral float
    (``1e3``) that a float holds exactly (a float's 53 bits: ``1e22`` would be off by one)."""
    t = text.strip()
    if "_" in t:
        raise ValueError(text)
    try:
        return int(t)
    except ValueError:
        pass
    f = float(t)
    if not f.is_integer() or abs(f) > 2**53:
        raise ValueError(text)
    return int(f)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class ObjectiveSpec:
    """Metadata of a registered objective (what ``list_objectives()`` returns)."""

    name: str
    params: list[ParamSpec]
    formula: str
    paper: str
    behaviour: str
    needs_teacher: bool = True
    needs_labels: bool = False
    version: int = 1
    aliases: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: str = ""
    source: str = ""
    fn: Callable = field(default=None, compare=False, repr=False)
    #: optional closed form ``gradient(s, t, **params) -> (per_position [N], terms, ∂Σ/∂s [N, V])``
    #: used by the training path instead of autograd on ``fn`` (checked against it at start-up)
    gradient: Callable | None = field(default=None, compare=False, repr=False)

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    @property
    def builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PACKAGE + ".")


def _split_doc(doc: str) -> tuple[str, str]:
    doc = inspect.cleandoc(doc or "")
    if not doc:
        return "", ""
    first, _, rest = doc.partition("\n")
    return first.strip(), inspect.cleandoc(rest).strip("\n")


def _source_of(fn: Callable) -> str:
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    path = getattr(module, "__kdbench_plugin_path__", None)
    return path or getattr(fn, "__module__", "") or "<unknown>"


# ---------------------------------------------------------------------------------------------
# Settings (canonical strings)
# ---------------------------------------------------------------------------------------------

_SETTING_RE = re.compile(r"^\s*([^\s()]+)\s*(?:\((.*)\))?\s*$", re.S)


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """``'csd(tau=1.5,w1=S)'`` → ``('csd', {'tau': '1.5', 'w1': 'S'})`` (values stay strings)."""
    m = _SETTING_RE.match(text)
    if not m:
        raise ObjectiveError(f"cannot read objective setting {text!r}; expected name or name(key=value,...)")
    name, body = m.group(1), m.group(2)
    params: dict[str, str] = {}
    if body and body.strip():
        for item in body.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ObjectiveError(f"cannot read {item.strip()!r} in objective setting {text!r}; expected key=value")
            if key.strip() in params:
                raise ObjectiveError(f"parameter {key.strip()!r} given twice in {text!r}")
            params[key.strip()] = value.strip()
    return name, params


def format_setting(spec: ObjectiveSpec, params: Mapping[str, Any]) -> str:
    """Canonical string: name plus the active parameters in sorted order."""
    shown = []
    for p in sorted(spec.params, key=lambda p: p.name):
        if p.active is not None and not p.active(dict(params)):
            continue
        shown.append(f"{p.name}={_fmt(params[p.name])}")
    return f"{spec.name}({','.join(shown)})" if shown else spec.name


def resolve_params(spec: ObjectiveSpec, params: Mapping[str, Any], *, fixed: Mapping[str, Any] | None = None, alias: str | None = None) -> dict[str, Any]:
    """Defaults + given values, coerced and validated (ObjectiveError naming valid choices)."""
    known = {p.name: p for p in spec.params}
    out = {p.name: p.default for p in spec.params}
    for key, value in (fixed or {}).items():
        out[key] = value
    for key, value in params.items():
        if key not in known:
            if not known:
                raise ObjectiveError(f"objective {spec.name!r} takes no parameters; got {key!r}")
            raise ObjectiveError(did_you_mean(key, [p.name for p in spec.params], what=f"parameter of objective {spec.name!r}"))
        coerced = known[key].coerce(value, owner=spec.name)
        if fixed and key in fixed and coerced != fixed[key]:
            raise ObjectiveError(
                f"alias {alias!r} fixes {key}={_fmt(fixed[key])}; use {spec.name!r} to set {key} freely"
            )
        out[key] = coerced
    return out
