"""The objectives registry: one decorator to declare an objective, one call to get it.

Declaring (one short file in ``objectives/``, or a plugin)::

    from kdbench.registry import objective, Param

    @objective("rkl", behaviour="mode-seeking", paper="... arXiv:2306.08543")
    def rkl(s, t):
        '''Reverse KL from the teacher: KL(q ‖ p) per position.

        KL(q‖p) = Σ_v q (log q − log p),  q = softmax(s), p = softmax(t)
        '''
        lq, lp = s.log_softmax(-1), t.log_softmax(-1)
        return (lq.exp() * (lq - lp)).sum(-1)

The function receives float32 rows ``s``, ``t`` ``[N, V]`` of counted positions only (already
selected and chunked), its parameters as keywords, ``labels=[N]`` if it declared
``needs_labels``, and returns the per-position loss ``[N]`` or ``(per_position, {term: [N]})``.
The first docstring line is the one-line summary, the rest the formula shown in the catalogue.

Using::

    from kdbench.registry import get_objective, list_objectives
    obj = get_objective("csd", tau="1.5")          # strings from the CLI are coerced
    loss = obj(student_logits, teacher_logits, mask, labels=None)
    out = obj.compute(student_logits, teacher_logits, mask)   # ObjectiveOutput(loss, terms)
    obj.setting   # 'csd(tau=1.5,w1=S,w2=S)'

Discovery is lazy (first lookup): every module of the top-level ``objectives`` package, the
``kdbench.objectives`` entry-point group, and files named as ``path/to/file.py:name``
(:func:`load_plugin_file`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import pkgutil
import re
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from kdbench import losses as _losses
from kdbench.errors import UserError, did_you_mean
from kdbench.losses import compute_from_hidden, loss_from_hidden  # noqa: F401  (re-exported)

__all__ = [
    "BEHAVIOURS",
    "ENTRY_POINT_GROUP",
    "Objective",
    "ObjectiveError",
    "ObjectiveOutput",
    "ObjectiveSpec",
    "Param",
    "ParamSpec",
    "compute_from_hidden",
    "format_setting",
    "get_objective",
    "list_objectives",
    "load_plugin_file",
    "loss_from_hidden",
    "objective",
    "parse_setting",
    "refresh",
]

BEHAVIOURS = ("mode-seeking", "mode-covering", "balanced", "supervised")
ENTRY_POINT_GROUP = "kdbench.objectives"
BUILTIN_PACKAGE = "objectives"
PARAM_TYPES = ("float", "int", "bool", "str", "choice")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_PLUGIN_PREFIX = "_kdbench_plugin_"


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
    ``min_exclusive``/``max_exclusive``). ``active(params) -> bool`` says whether the value
    matters for the resolved parameters; inactive ones are left out of the setting string
    (e.g. CSD's ``alpha`` is only used by the ``mix`` weighting).
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
        object.__setattr__(self, "default", self.coerce(self.default, owner="default of"))

    # -- values -----------------------------------------------------------------------------
    def range_text(self) -> str:
        if self.min is None and self.max is None:
            return ""
        lo = "(" if self.min_exclusive or self.min is None else "["
        hi = ")" if self.max_exclusive or self.max is None else "]"
        a = "-inf" if self.min is None else _fmt(self.min)
        b = "inf" if self.max is None else _fmt(self.max)
        return f"{lo}{a}, {b}{hi}"

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
        except (TypeError, ValueError):
            rng = self.range_text()
            raise ObjectiveError(f"{where} expects a {t}{' in ' + rng if rng else ''}, got {value!r}") from None
        if isinstance(num, float) and not math.isfinite(num):
            raise ObjectiveError(f"{where} must be finite, got {value!r}")
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
    f = float(text.strip())
    if not f.is_integer():
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


def objective(
    name: str,
    *,
    behaviour: str,
    paper: str,
    params: list[ParamSpec] | tuple[ParamSpec, ...] = (),
    aliases: Mapping[str, Mapping[str, Any]] | None = None,
    needs_teacher: bool = True,
    needs_labels: bool = False,
    version: int = 1,
    summary: str | None = None,
    formula: str | None = None,
):
    """Register ``fn(s, t, **params) -> per_position [N]`` (or ``(per_position, terms)``).

    ``summary`` defaults to the first docstring line, ``formula`` to the rest of it.
    ``aliases`` maps alias names to fixed parameter values (e.g. ``{"csd_ts": {"w1": "T",
    "w2": "S"}}``); ``version`` is bumped whenever the formula changes.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ObjectiveError(f"objective name {name!r} must be an identifier (letters, digits, _)")
    if behaviour not in BEHAVIOURS:
        raise ObjectiveError(did_you_mean(str(behaviour), list(BEHAVIOURS), what=f"behaviour for objective {name!r}"))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ObjectiveError(f"objective {name!r}: version must be a positive int, got {version!r}")
    params = list(params)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ObjectiveError(f"objective {name!r} declares a parameter twice: {names}")

    def decorate(fn: Callable) -> Callable:
        doc_summary, doc_formula = _split_doc(fn.__doc__ or "")
        sig = inspect.signature(fn)
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        wanted = names + (["labels"] if needs_labels else [])
        missing = [n for n in wanted if n not in sig.parameters and not accepts_any]
        if missing:
            raise ObjectiveError(f"objective {name!r}: {fn.__qualname__} does not accept parameter(s) {missing}")
        fixed_aliases: dict[str, dict[str, Any]] = {}
        for alias, fixed in (aliases or {}).items():
            if not _NAME_RE.match(alias) or alias == name:
                raise ObjectiveError(f"objective {name!r}: bad alias name {alias!r}")
            out = {}
            for k, v in fixed.items():
                if k not in names:
                    raise ObjectiveError(did_you_mean(k, names, what=f"parameter in alias {alias!r} of {name!r}"))
                out[k] = params[names.index(k)].coerce(v, owner=f"alias {alias!r}:")
            fixed_aliases[alias] = out
        spec = ObjectiveSpec(
            name=name,
            params=params,
            formula=(formula if formula is not None else doc_formula).strip("\n"),
            paper=paper,
            behaviour=behaviour,
            needs_teacher=bool(needs_teacher),
            needs_labels=bool(needs_labels),
            version=version,
            aliases=fixed_aliases,
            summary=(summary if summary is not None else doc_summary),
            source=_source_of(fn),
            fn=fn,
        )
        fn.__kdbench_spec__ = spec
        _register(spec)
        return fn

    return decorate


def _source_of(fn: Callable) -> str:
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    path = getattr(module, "__kdbench_plugin_path__", None)
    return path or getattr(fn, "__module__", "") or "<unknown>"


# ---------------------------------------------------------------------------------------------
# Registry state and discovery
# ---------------------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.specs: dict[str, ObjectiveSpec] = {}
        self.aliases: dict[str, str] = {}
        self.discovered = False


_state = _State()
_lock = threading.RLock()
_plugin_modules: dict[str, types.ModuleType] = {}


def _same(a: ObjectiveSpec, b: ObjectiveSpec) -> bool:
    if a.fn is b.fn:
        return True
    return a.source == b.source and getattr(a.fn, "__qualname__", None) == getattr(b.fn, "__qualname__", None)


def _register(spec: ObjectiveSpec) -> None:
    with _lock:
        st = _state
        existing = st.specs.get(spec.name)
        if existing is not None and not _same(existing, spec):
            raise ObjectiveError(
                f"objective {spec.name!r} is declared twice: in {existing.source} and in {spec.source}; "
                f"rename one of them"
            )
        if spec.name in st.aliases and st.aliases[spec.name] != spec.name:
            raise ObjectiveError(
                f"objective name {spec.name!r} (from {spec.source}) is already an alias of "
                f"{st.aliases[spec.name]!r}"
            )
        for alias in spec.aliases:
            owner = st.aliases.get(alias)
            if alias in st.specs or (owner is not None and owner != spec.name):
                raise ObjectiveError(
                    f"alias {alias!r} of objective {spec.name!r} (from {spec.source}) is already taken by "
                    f"{owner or alias!r}"
                )
        if existing is not None:
            for alias in existing.aliases:
                st.aliases.pop(alias, None)
        st.specs[spec.name] = spec
        for alias in spec.aliases:
            st.aliases[alias] = spec.name


def _register_object(obj: Any) -> list[ObjectiveSpec]:
    """Register what a module / decorated function / spec declares."""
    if isinstance(obj, types.ModuleType):
        found = []
        for value in list(vars(obj).values()):
            spec = getattr(value, "__kdbench_spec__", None)
            if isinstance(spec, ObjectiveSpec):
                _register(spec)
                if spec not in found:
                    found.append(spec)
        return found
    spec = obj if isinstance(obj, ObjectiveSpec) else getattr(obj, "__kdbench_spec__", None)
    if not isinstance(spec, ObjectiveSpec):
        raise ObjectiveError(f"{obj!r} is not an objective (decorate it with @kdbench.registry.objective)")
    _register(spec)
    return [spec]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """Installed plugins (monkeypatched in tests)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _discover() -> None:
    if _state.discovered:
        return
    with _lock:
        if _state.discovered:
            return
        package = importlib.import_module(BUILTIN_PACKAGE)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
            _register_object(module)
        for ep in _entry_points():
            try:
                loaded = ep.load()
            except ObjectiveError as exc:  # a bad declaration (e.g. a duplicate name) is an error
                raise ObjectiveError(f"entry point {ep.name!r} ({ep.value}): {exc}") from None
            except Exception as exc:  # a broken third-party plugin must not hide the others
                warnings.warn(
                    f"kdbench: objective plugin entry point {ep.name!r} ({ep.value}) failed to load: "
                    f"{type(exc).__name__}: {exc}",
                    stacklevel=2,
                )
                continue
            try:
                _register_object(loaded)
            except ObjectiveError as exc:
                raise ObjectiveError(f"entry point {ep.name!r} ({ep.value}): {exc}") from None
        _state.discovered = True


def refresh() -> None:
    """Forget what was discovered and look again (new entry points, tests)."""
    with _lock:
        _state.discovered = False
        _discover()


def load_plugin_file(path: str | Path) -> list[ObjectiveSpec]:
    """Import a Python file (once per process) and register the objectives it declares."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ObjectiveError(f"objective plugin file not found: {str(path)!r}")
    p = p.resolve()
    key = str(p)
    _discover()
    with _lock:
        module = _plugin_modules.get(key)
        if module is None:
            stem = re.sub(r"\W", "_", p.stem)
            modname = f"{_PLUGIN_PREFIX}{hashlib.sha1(key.encode()).hexdigest()[:10]}_{stem}"
            spec = importlib.util.spec_from_file_location(modname, p)
            if spec is None or spec.loader is None:
                raise ObjectiveError(f"cannot import objective plugin file {key!r}")
            module = importlib.util.module_from_spec(spec)
            module.__kdbench_plugin_path__ = key
            sys.modules[modname] = module
            try:
                spec.loader.exec_module(module)
            except ObjectiveError:
                sys.modules.pop(modname, None)
                raise
            except Exception as exc:
                sys.modules.pop(modname, None)
                raise ObjectiveError(f"objective plugin file {key!r} failed to import: {type(exc).__name__}: {exc}") from exc
            _plugin_modules[key] = module
        found = _register_object(module)
    if not found:
        raise ObjectiveError(f"objective plugin file {key!r} declares no objective (use @objective(...))")
    return found


def list_objectives(*, include_plugins: bool = True) -> list[ObjectiveSpec]:
    """All registered objectives, sorted by name (``include_plugins=False``: built-ins only)."""
    _discover()
    specs = sorted(_state.specs.values(), key=lambda s: s.name)
    if not include_plugins:
        specs = [s for s in specs if s.builtin]
    return specs


def _all_names() -> list[str]:
    return sorted(set(_state.specs) | set(_state.aliases))


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


def _resolve_name(name: str) -> tuple[ObjectiveSpec, dict[str, Any], str | None]:
    st = _state
    if name in st.specs:
        return st.specs[name], {}, None
    if name in st.aliases:
        spec = st.specs[st.aliases[name]]
        return spec, dict(spec.aliases[name]), name
    raise ObjectiveError(did_you_mean(name, _all_names(), what="objective"))


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


def get_objective(name: "str | ObjectiveSpec | Objective", /, **params: Any) -> "Objective":
    """The objective ``name`` with ``params`` (Python values or CLI strings).

    ``name`` may be a registered name, an alias (``csd_ts``), a setting string
    (``csd(tau=1.5,w1=T)``) or ``path/to/file.py:name`` (the file is imported and registered).
    Unknown names/parameters raise :class:`ObjectiveError` (a ``ValueError``) listing the valid
    choices, closest match first.
    """
    if isinstance(name, Objective):
        spec, fixed, alias = name.spec, {}, None
        params = {**name.params, **params}
    elif isinstance(name, ObjectiveSpec):
        spec, fixed, alias = name, {}, None
    else:
        if not isinstance(name, str):
            raise ObjectiveError(f"objective name must be a string, got {type(name).__name__}")
        text = name.strip()
        base, colon, objname = text.rpartition(":")
        if colon and base.endswith(".py"):
            specs = load_plugin_file(base)
            text = objname.strip()
            if not text:
                if len(specs) != 1:
                    raise ObjectiveError(
                        f"{base} declares {len(specs)} objectives; name one: "
                        + ", ".join(f"{base}:{s.name}" for s in specs)
                    )
                text = specs[0].name
        elif text.endswith(".py"):
            raise ObjectiveError(f"to use an objective from a file, name it: {text}:<objective name>")
        setting_params: dict[str, str] = {}
        if "(" in text:
            text, setting_params = parse_setting(text)
            for key in setting_params:
                if key in params:
                    raise ObjectiveError(f"parameter {key!r} given both in {name!r} and as a keyword")
        _discover()
        spec, fixed, alias = _resolve_name(text)
        params = {**setting_params, **params}
    resolved = resolve_params(spec, params, fixed=fixed, alias=alias)
    return Objective(spec, resolved)


# ---------------------------------------------------------------------------------------------
# The callable objective
# ---------------------------------------------------------------------------------------------


class ObjectiveOutput(NamedTuple):
    loss: Tensor
    terms: dict[str, Tensor]


class Objective:
    """A configured objective: ``obj(student_logits, teacher_logits, mask, labels=None)``."""

    def __init__(self, spec: ObjectiveSpec, params: Mapping[str, Any]):
        self.spec = spec
        self.name = spec.name
        self.params = dict(params)
        self.setting = format_setting(spec, self.params)

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher

    @property
    def needs_labels(self) -> bool:
        return self.spec.needs_labels

    @property
    def behaviour(self) -> str:
        return self.spec.behaviour

    def __repr__(self) -> str:
        return f"Objective({self.setting!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Objective) and other.spec is self.spec and other.params == self.params

    def __hash__(self) -> int:
        return hash((self.name, self.setting))

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, mask: Tensor | None, labels: Tensor | None = None, **kwargs) -> Tensor:
        return self.compute(student_logits, teacher_logits, mask, labels, **kwargs).loss

    # one chunk of counted rows → (Σ loss, {term: Σ}) ; shared with the hidden-state path
    def row_sums(self, s: Tensor, t: Tensor | None, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        per_row, terms = self.per_position(s, t, labels)
        return per_row.sum(), {k: v.detach().sum() for k, v in terms.items()}

    def per_position(self, s: Tensor, t: Tensor | None, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on rows ``[N, V]`` (no masking, no chunking): ``([N], {term: [N]})``."""
        dtype = _losses.compute_dtype(s.dtype)
        s = s.to(dtype)
        t = None if t is None else t.to(dtype)
        kwargs = dict(self.params)
        if self.spec.needs_labels:
            kwargs["labels"] = labels
        with torch.autocast(device_type=s.device.type, enabled=False):  # objective math in float32
            out = self.spec.fn(s, t, **kwargs)
        if isinstance(out, tuple):
            per_row, terms = out
        else:
            per_row, terms = out, {}
        if not isinstance(per_row, Tensor) or tuple(per_row.shape) != (s.shape[0],):
            got = tuple(per_row.shape) if isinstance(per_row, Tensor) else type(per_row).__name__
            raise RuntimeError(f"objective {self.name!r} must return a per-position tensor of shape ({s.shape[0]},), got {got}")
        return per_row, dict(terms or {})

    def compute(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        mask: Tensor | None,
        labels: Tensor | None = None,
        *,
        vocab_size: int | None = None,
        chunk_size: int | None = None,
        checkpoint: bool | None = None,
    ) -> ObjectiveOutput:
        """Mean over counted positions of the per-position loss, plus detached mean terms.

        Logits ``[..., V]`` of any float dtype (computed in float32; float64 stays float64),
        ``mask`` of the leading shape (``None`` = all count), ``labels`` of the leading shape
        (only objectives with ``needs_labels``). ``vocab_size`` slices padded head columns off
        both sides. Nothing counted → exactly 0.0, still attached to the graph.
        """
        s = student_logits
        if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() < 1:
            raise ValueError("student_logits must be a floating-point tensor [..., V]")
        spec = self.spec
        t = teacher_logits if spec.needs_teacher else None
        if spec.needs_teacher:
            if t is None:
                raise ValueError(f"objective {self.name!r} needs teacher_logits")
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError("teacher_logits must be a floating-point tensor [..., V]")
            if t.shape[:-1] != s.shape[:-1]:
                raise ValueError(
                    f"teacher_logits have positions {tuple(t.shape[:-1])}, student_logits {tuple(s.shape[:-1])}"
                )
        s, t = _losses.align_vocab(s, t, vocab_size)
        lead = s.shape[:-1]
        vocab = s.shape[-1]
        idx, n = _losses.counted_rows(mask, lead, s.device)
        s_rows = s.reshape(-1, vocab)
        t_rows = None if t is None else t.reshape(-1, vocab)
        y_rows = None
        if spec.needs_labels:
            if labels is None:
                raise ValueError(f"objective {self.name!r} needs labels (the reference next tokens)")
            if tuple(labels.shape) != tuple(lead):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(lead)}")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError("labels must be integer token ids")
            y_rows = labels.reshape(-1).to(device=s.device, dtype=torch.long)
        if idx is not None:
            s_rows = s_rows.index_select(0, idx)
            t_rows = None if t_rows is None else t_rows.index_select(0, idx)
            y_rows = None if y_rows is None else y_rows.index_select(0, idx)
        if y_rows is not None:
            _losses.check_labels(y_rows, vocab)
        size = _losses.CHUNK_SIZE if chunk_size is None else chunk_size
        loss_sum, term_sums = _losses.chunked_sums(self.row_sums, [s_rows, t_rows, y_rows], size, checkpoint=checkpoint)
        denom = max(n, 1)
        return ObjectiveOutput(loss_sum / denom, {k: (v / denom).detach() for k, v in term_sums.items()})
