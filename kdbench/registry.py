"""The objectives registry: one decorator to declare an objective, one call to get it.

Declaring (one short file in the top-level ``objectives/`` folder, or a plugin)::

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

Discovery is lazy (first lookup): every module of the built-in ``kdbench.objectives`` package
(the ``objectives/`` folder, installed only under kdbench, so an ``objectives/`` folder in the
working directory can never shadow it),
then only what the user names: the ``kdbench.objectives`` entry-point group, the folders of
``$KDBENCH_PLUGIN_PATH`` and files named as ``path/to/file.py:name`` (:func:`load_plugin_file`;
finding and importing them is kdbench/plugins.py).
A plug-in that fails to load (import error, syntax error, ``sys.exit`` at import, bad or
duplicate declaration) is skipped with one :class:`~kdbench.errors.KdbenchWarning` naming it; asking for it by name
raises that failure as an :class:`ObjectiveError`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import threading
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from kdbench import plugins
from kdbench.errors import KdbenchWarning, did_you_mean

# Declarations (objective_spec) and the callable objective (objective) live in their own modules;
# every name stays importable from here, where objective files and callers have always taken them.
from kdbench.objective import Objective, ObjectiveOutput  # noqa: F401  (re-exported)
from kdbench.objective_spec import (  # noqa: F401  (re-exported)
    _NAME_RE, BUILTIN_PACKAGE, PARAM_TYPES, ObjectiveError, ObjectiveSpec, Param, ParamSpec,
    _source_of, _split_doc, format_setting, parse_setting, resolve_params,
)

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
    "broken_plugins",
    "load_plugin_file",
    "loss_from_hidden",
    "objective",
    "parse_setting",
    "refresh",
]

BEHAVIOURS = ("mode-seeking", "mode-covering", "balanced", "supervised")
ENTRY_POINT_GROUP = plugins.ENTRY_POINT_GROUP
PLUGIN_PATH_VAR = plugins.PLUGIN_PATH_VAR


# ---------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------


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
    gradient: Callable | None = None,
):
    """Register ``fn(s, t, **params) -> per_position [N]`` (or ``(per_position, terms)``).

    ``summary`` defaults to the first docstring line, ``formula`` to the rest of it.
    ``aliases`` maps alias names to fixed parameter values (e.g. ``{"csd_ts": {"w1": "T",
    "w2": "S"}}``); ``version`` is bumped whenever the formula changes. ``gradient``, optional: the closed form ``gradient(s, t, **params) ->
    (per_position [N], terms, ∂(Σ per_position)/∂s [N, V])``, computed without autograd; the
    training path uses it instead of differentiating ``fn`` (fewer passes over the
    vocabulary), and the start-up check compares it with autograd on ``fn`` for every run.
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
        if gradient is not None:
            if not callable(gradient):
                raise ObjectiveError(f"objective {name!r}: gradient must be a function, got {type(gradient).__name__}")
            gsig = inspect.signature(gradient)
            g_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in gsig.parameters.values())
            g_missing = [n for n in wanted if n not in gsig.parameters and not g_any]
            if g_missing:
                raise ObjectiveError(f"objective {name!r}: its gradient {gradient.__qualname__} does not accept "
                                     f"parameter(s) {g_missing}")
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
            gradient=gradient,
        )
        fn.__kdbench_spec__ = spec
        _register(spec)
        return fn

    return decorate


# ---------------------------------------------------------------------------------------------
# Registry state and discovery
# ---------------------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.specs: dict[str, ObjectiveSpec] = {}
        self.aliases: dict[str, str] = {}
        self.discovered = False
        # plug-ins that failed to load: their name (entry-point name / file stem) -> one-line reason
        self.broken: dict[str, str] = {}
        self.warned: set[str] = set()


_state = _State()
_lock = threading.RLock()


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


def _spec_of(value: Any) -> ObjectiveSpec | None:
    """The declaration ``@objective`` attached to ``value``, if any. A plug-in's module may hold
    any object, including one whose ``__getattr__`` raises something other than AttributeError:
    such an object declares nothing."""
    try:
        spec = getattr(value, "__kdbench_spec__", None)
    except Exception:
        return None
    return spec if isinstance(spec, ObjectiveSpec) else None


def _register_object(obj: Any) -> list[ObjectiveSpec]:
    """Register what a module / decorated function / spec declares."""
    if isinstance(obj, types.ModuleType):
        found = []
        for value in list(vars(obj).values()):
            spec = _spec_of(value)
            if spec is not None:
                _register(spec)
                if spec not in found:
                    found.append(spec)
        return found
    spec = obj if isinstance(obj, ObjectiveSpec) else _spec_of(obj)
    if spec is None:
        raise ObjectiveError(f"{obj!r} is not an objective (decorate it with @kdbench.registry.objective)")
    _register(spec)
    return [spec]


def _guarded(key: str, label: str, load: Callable[[], Any]) -> None:
    """Load one plug-in; on any failure undo what it registered and remember it as broken."""
    with _lock:
        specs, aliases = dict(_state.specs), dict(_state.aliases)
        try:
            found = load()
            if isinstance(found, list) and not found:
                raise ObjectiveError("it declares no objective (use @objective(...))")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plug-in (one calling sys.exit too) must not take the others down
            _state.specs, _state.aliases = specs, aliases
            reason = plugins.one_line(exc)
            _state.broken[key] = (f"objective plug-in {label} failed to load: {reason}" if label.startswith("entry")
                                  else f"{reason} ({label})")


def _discover() -> None:
    if _state.discovered:
        return
    with _lock:
        if _state.discovered:
            return
        dirs = plugins.plugin_dirs()  # a bad $KDBENCH_PLUGIN_PATH is an error before anything loads
        _state.broken = {}
        package = importlib.import_module(BUILTIN_PACKAGE)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
            _register_object(module)  # a broken built-in is our bug: let it raise
        for ep in plugins.entry_points():
            _guarded(ep.name, f"entry point {ep.name!r} ({ep.value})", lambda ep=ep: _register_object(ep.load()))
        for path in plugins.plugin_files(dirs):
            _guarded(path.stem, f"from ${PLUGIN_PATH_VAR}", lambda path=path: _load_file(path))
        _state.discovered = True


def broken_plugins() -> dict[str, str]:
    """Plug-ins that failed to load at discovery: name -> one-line reason (they are skipped)."""
    _discover()
    return dict(_state.broken)


def _warn_broken(skip: tuple[str, ...] = ()) -> None:
    """One warning per broken plug-in and process (the CLI prints ``kdbench: warning: ...``)."""
    for key, message in sorted(_state.broken.items()):
        if key in skip or key in _state.warned:
            continue
        _state.warned.add(key)
        warnings.warn(message + "; skipped", KdbenchWarning, stacklevel=3)


def refresh() -> None:
    """Forget what was discovered and look again (new entry points, tests)."""
    with _lock:
        _state.discovered = False
        _state.warned = set()
        _discover()


def load_plugin_file(path: str | Path) -> list[ObjectiveSpec]:
    """Import a Python file (once per process) and register the objectives it declares."""
    _discover()
    return _load_file(path)


def _load_file(path: str | Path) -> list[ObjectiveSpec]:
    with _lock:
        specs, aliases = dict(_state.specs), dict(_state.aliases)
        try:
            module = plugins.import_file(path)
        except BaseException:
            _state.specs, _state.aliases = specs, aliases  # nothing half-registered stays
            raise
        found = _register_object(module)
    if not found:
        raise ObjectiveError(f"objective plugin file {module.__kdbench_plugin_path__!r} declares no objective "
                             f"(use @objective(...))")
    return found


def list_objectives(*, include_plugins: bool = True) -> list[ObjectiveSpec]:
    """All registered objectives, sorted by name (``include_plugins=False``: built-ins only)."""
    _discover()
    _warn_broken()
    specs = sorted(_state.specs.values(), key=lambda s: s.name)
    if not include_plugins:
        specs = [s for s in specs if s.builtin]
    return specs


def _all_names() -> list[str]:
    return sorted(set(_state.specs) | set(_state.aliases))


# ---------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------


def _resolve_name(name: str) -> tuple[ObjectiveSpec, dict[str, Any], str | None]:
    st = _state
    if name in st.specs:
        return st.specs[name], {}, None
    if name in st.aliases:
        spec = st.specs[st.aliases[name]]
        return spec, dict(spec.aliases[name]), name
    if name in st.broken:  # the objective asked for is the plug-in that failed: say why
        raise ObjectiveError(st.broken[name])
    message = did_you_mean(name, _all_names(), what="objective")
    if st.broken:
        message += "; plug-ins that failed to load: " + ", ".join(sorted(st.broken))
    raise ObjectiveError(message)


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
    _warn_broken()  # the command goes on without them: say so once
    return Objective(spec, resolved)


# ---------------------------------------------------------------------------------------------
# The hidden-state path by name (the method is Objective.from_hidden)
# ---------------------------------------------------------------------------------------------


def compute_from_hidden(obj: "str | Objective", student_hidden, student_head, teacher_hidden=None, teacher_head=None,
                        mask=None, labels=None, *, chunk_size: int | None = None,
                        vocab_size: int | None = None) -> ObjectiveOutput:
    """:meth:`Objective.from_hidden` for an objective or a name / setting string."""
    return get_objective(obj).from_hidden(student_hidden, student_head, teacher_hidden, teacher_head, mask, labels,
                                          chunk_size=chunk_size, vocab_size=vocab_size)


def loss_from_hidden(obj: "str | Objective", *args, **kwargs):
    """The loss of :func:`compute_from_hidden` (mean over counted positions, 0-dim)."""
    return compute_from_hidden(obj, *args, **kwargs).loss
