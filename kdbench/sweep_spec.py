"""What a ``kdbench sweep`` runs: its specification (:class:`SweepSpec`, from a YAML file or the
flags), checked whole (:func:`validate`) and expanded into jobs (:func:`expand`) -- objectives ×
samplers × parameter grids × tuning grid × training seeds × suites, each job one
:class:`kdbench.config.RunConfig` with its run key. Running the jobs is kdbench/sweep.py's.

Specification file (every key optional except objectives)::

    suites: [micro]
    objectives: [ce, kl, rkl, csd_ss, "csd(w1=T,w2=S,tau=1.5)", tvd]
    samplers: [off, imitkd]          # where training responses come from (default: the run option, off)
    seeds: [0, 1, 2]
    params: {tau: [1.0, 1.5]}        # applied to the objectives that declare the parameter
    tune: {lr: [1.0e-4, 3.0e-4]}
    workers: 1
    run: {steps: 3, eval_limit: 3}   # any `kdbench run` option, for every job

Samplers: every objective runs under every sampler, except that an objective that uses no
teacher (``ce``) runs under ``off`` only -- the others train on responses the teacher scores.
``samplers`` (``--samplers``) and the run option ``sampler`` (``--sampler``) are one or the other.

Equal tuning budget: ``--tune lr=1e-4,3e-4`` gives every objective the same grid (which point
wins, on validation only, is the sweep's summary: kdbench/sweep.py ``tuning_report``).

The specification is checked whole before anything is prepared, opened or run (:func:`validate`,
then :func:`expand` against the objectives): every mistake -- a seed that is not an integer in
[0, 2³²−1], an empty grid, a grid no objective of the sweep declares, a run option of the wrong
type, a learning rate that is not a positive number, a value given twice -- is one line. Numbers
in a file are read as strictly as on the command line (no ``1_5``, no octal ``010``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.config import RunConfig, command_line, from_flags, options, resolve_suite, run_key
from kdbench.errors import UserError
from kdbench.run_option import SEED_MAX, _int_in, _positive_float, flag_value


def _tunable() -> tuple[str, ...]:
    """The RunConfig options `--tune` may grid over (sweep role "tune": lr)."""
    return tuple(o.name for o in options("sweep") if o.sweep == "tune")


def _run_keys() -> dict:
    """{key of a sweep file's ``run:`` mapping (the flag's name: no_save): its RunConfig option}:
    the options a sweep passes to every job (sweep role "every" or "tune")."""
    return {o.key: o for o in options("sweep") if o.sweep in ("every", "tune")}


@dataclass
class SweepSpec:
    objectives: list[str]
    samplers: list[str] | None = None  # None: the run option's one sampler (default off)
    seeds: list[int] = field(default_factory=lambda: [0])
    suites: list[str] = field(default_factory=lambda: ["micro"])
    params: dict[str, list] = field(default_factory=dict)
    tune: dict[str, list] = field(default_factory=dict)
    workers: int = 1
    gpus_per_run: int = 1  # > 1: each job one run on that many processes, one GPU each
    run: dict = field(default_factory=dict)
    db: str | None = None
    source: str = ""  # where it was written ("sweep file x.yaml"), for messages; "" for flags

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "SweepSpec":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise UserError(f"sweep file {path} not found")
        try:
            doc = yaml.load(p.read_text(), Loader=_strict_yaml_loader()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"sweep file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(doc, dict):
            raise UserError(f"sweep file {path}: expected a mapping of keys (objectives, seeds, ...)")
        known = {"objectives", "samplers", "seeds", "suites", "params", "tune", "workers", "gpus_per_run", "run",
                 "db"}
        unknown = set(doc) - known
        if unknown:
            raise UserError(f"sweep file {path}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(known))}")
        if not isinstance(doc.get("run") or {}, dict):  # the command line's run options are merged into it
            raise UserError(f"sweep file {path}: run must be a mapping of `kdbench run` options, e.g. "
                            f"run: {{steps: 3}}; got {doc['run']!r}")
        doc.update({k: v for k, v in overrides.items() if v not in (None, [], {})})
        if not doc.get("objectives"):
            raise UserError(f"sweep file {path}: needs a list of objectives")
        return cls(**{k: v for k, v in doc.items()}, source=f"sweep file {path}")


@dataclass
class Job:
    suite: str
    objective: str               # a setting string (name or name(k=v,...))
    params: dict                 # grid parameters of the objective
    train: dict                  # tuned TrainSpec overrides (lr)
    seed: int
    key: str = ""                # runs.config_hash of its run
    setting: str = ""
    label: str = ""
    config: RunConfig | None = None  # the job's run configuration (store and sweep id aside)

    def run_config(self, sweep_id: str | None, db: str | None) -> RunConfig:
        """What the job's ``kdbench run`` gets; ``db``: the store to name (None: the store comes
        from ``$KDBENCH_DB``, as it does when the URL holds a password)."""
        return dataclasses.replace(self.config, sweep_id=sweep_id, db=db, progress=False)

    def argv(self, sweep_id: str, db: str | None) -> list[str]:
        """The ``kdbench run`` command line that gives the job's configuration (``--dry-run``)."""
        return command_line(self.run_config(sweep_id, db), "run")


def _grid(values: dict[str, list]) -> list[dict]:
    keys = sorted(values)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))] or [{}]


# ---------------------------------------------------------------------------------------------
# The specification, checked whole before the first job (each mistake: one line, exit 2)
# ---------------------------------------------------------------------------------------------

_YAML_INT = "tag:yaml.org,2002:int"
_YAML_FLOAT = "tag:yaml.org,2002:float"


def _strict_yaml_loader():
    """PyYAML's safe loader with plain numbers only. YAML 1.1 reads ``1_5`` as 15, ``010`` as 8
    (octal), ``0x1F`` and ``1:30`` (= 90) as numbers, and ``1e-4`` as a string: here an integer
    is decimal digits without a leading zero, a float has a point or an exponent (``1e-4``,
    ``.inf``), and anything else stays a string, which the checks below read as strictly as the
    command line does (``1_5`` refused)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_YAML_INT, _YAML_FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(_YAML_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
    Loader.add_implicit_resolver(
        _YAML_FLOAT, re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?$"
                                r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))
    return Loader


#: The flag a key of the specification comes from when the sweep has no file (messages name it).
_FLAGS = {"objectives": "--objectives", "samplers": "--samplers", "seeds": "--seeds", "suites": "--suite", "params": "--param",
          "tune": "--tune", "workers": "--workers", "gpus_per_run": "--gpus-per-run", "db": "--db"}


def _where(spec: SweepSpec, key: str) -> str:
    """'sweep file s.yaml: params.tau' for a file, '--param tau' (or '--steps' for run.steps) for flags."""
    if spec.source:
        return f"{spec.source}: {key}"
    head, _, sub = key.partition(".")
    if head == "run":
        return _run_keys()[sub].flag if sub in _run_keys() else sub
    flag = _FLAGS.get(head, head)
    return f"{flag} {sub}" if sub else flag


def _parsed(parse, text: str, prefix: str = ""):
    """``parse(text)`` with a flag's argparse type: its refusal is the one line."""
    import argparse

    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"{prefix}{exc}") from None


def _items(spec: SweepSpec, key: str, value, *, split: bool = True) -> list:
    """A non-empty list from a list, a single value or (``split``) a comma-separated string."""
    if isinstance(value, (list, tuple)):
        out = list(value)
    elif isinstance(value, str) and split:
        out = [v.strip() for v in value.split(",")]
        if not all(out):
            raise UserError(f"{_where(spec, key)} has an empty value in {value!r}")
    else:
        out = [value]
    if not out:
        raise UserError(f"{_where(spec, key)} is empty: give at least one value")
    return out


def _integer(spec: SweepSpec, key: str, value, lo: int, hi: int) -> int:
    """An integer in [lo, hi], read as the flag reads one (``1_0``, ``1.5``, ``true`` refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{_where(spec, key)} must be an integer in [{lo}, {hi}], got {value!r}")
    return _parsed(_int_in(_where(spec, key), lo, hi), str(value))


def _positive(spec: SweepSpec, key: str, value) -> float:
    """A positive finite number, read as ``kdbench run --lr`` reads one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{_where(spec, key)} must be a positive number, got {value!r}")
    return _parsed(_positive_float(_where(spec, key)), str(value))


def _strings(spec: SweepSpec, key: str, values: list, what: str) -> list[str]:
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"{_where(spec, key)} must be {what} (strings), got {v!r}")
    return values


def _once(spec: SweepSpec, key: str, values: list) -> list:
    """``values`` with none twice: a repeated seed or grid point would name the same run twice."""
    for i, v in enumerate(values):
        if v in values[:i]:
            raise UserError(f"{_where(spec, key)} lists {v!r} twice")
    return values


def _run_options(spec: SweepSpec) -> dict:
    """The `kdbench run` options of every job (keys: the flags' names), typed as their flags are."""
    run = {} if spec.run is None else spec.run
    if not isinstance(run, dict):
        raise UserError(f"{_where(spec, 'run')} must be a mapping of `kdbench run` options (run: {{steps: 3}}), "
                        f"got {run!r}")
    known = _run_keys()
    bad = set(run) - set(known)
    if bad:
        raise UserError(f"sweep run option(s) {', '.join(sorted(map(str, bad)))} unknown; known: "
                        f"{', '.join(sorted(known))}")
    return {key: flag_value(known[key], value, _where(spec, f"run.{key}")) for key, value in run.items()}


def _grid_values(spec: SweepSpec, key: str) -> dict[str, list]:
    """``params`` or ``tune``: {name: [values]}, no grid empty."""
    value = {} if getattr(spec, key) is None else getattr(spec, key)
    if not isinstance(value, dict):
        raise UserError(f"{_where(spec, key)} must be a mapping of name: [values], e.g. "
                        f"{key}: {{{'tau' if key == 'params' else 'lr'}: [...]}}, got {value!r}")
    grid = {}
    for name, values in value.items():
        if isinstance(values, str) and "," in values and spec.source:
            # in a file a grid is a list; "1,5" could as well be a decimal comma
            raise UserError(f"{_where(spec, f'{key}.{name}')} is the string {values!r}: write a list, e.g. "
                            f"{name}: [{', '.join(v.strip() for v in values.split(','))}]")
        items = _items(spec, f"{key}.{name}", values)
        for v in items:
            if v is None or isinstance(v, (dict, list, tuple)):
                raise UserError(f"{_where(spec, f'{key}.{name}')} must be a list of values, got {v!r} in it")
        grid[str(name)] = items
    return grid


def validate(spec: SweepSpec) -> dict:
    """The whole specification, checked before any job is made, prepared or run: objectives a
    list of names or settings; seeds integers in [0, 2³²−1]; workers an integer ≥ 1; run options
    typed as their `kdbench run` flags; tuned learning rates positive and finite; no grid empty
    and no value twice. Returns the values normalised: {objectives, seeds, suites, params, tune,
    workers, run}. Grid keys and values are checked against the objectives by :func:`expand`."""
    if isinstance(spec.objectives, str):  # a setting may hold commas (csd(tau=1.5,w1=T)): no guessing
        raise UserError(f"{_where(spec, 'objectives')} must be a list, e.g. objectives: [{spec.objectives}]; got "
                        f"the string {spec.objectives!r}")
    objectives = _items(spec, "objectives", spec.objectives, split=False)
    objectives = _once(spec, "objectives", _strings(spec, "objectives", objectives, "objective names or settings"))
    samplers = None
    if spec.samplers is not None:
        # YAML 1.1 reads a bare `off` as false: in a sampler list it can only be the sampler off
        samplers = ["off" if v is False else v for v in _items(spec, "samplers", spec.samplers, split=False)]
        samplers = _once(spec, "samplers", _strings(spec, "samplers", samplers, "sampler names or settings"))
        if (spec.run or {}).get("sampler") is not None:
            raise UserError(f"{_where(spec, 'samplers')} and the run option sampler (--sampler) both given; give the "
                            f"samplers in one list")
    seeds = _items(spec, "seeds", [0] if spec.seeds is None else spec.seeds)
    seeds = _once(spec, "seeds", [_integer(spec, "seeds", s, 0, SEED_MAX) for s in seeds])
    suites = _items(spec, "suites", ["micro"] if spec.suites is None else spec.suites)
    suites = _once(spec, "suites", _strings(spec, "suites", suites, "suite names"))
    params = {k: _once(spec, f"params.{k}", v) for k, v in _grid_values(spec, "params").items()}
    tune = _grid_values(spec, "tune")
    bad = set(tune) - set(_tunable())
    if bad:
        raise UserError(f"--tune {', '.join(sorted(bad))}: only {', '.join(_tunable())} can be tuned")
    tune = {k: _once(spec, f"tune.{k}", [_positive(spec, f"tune.{k}", x) for x in v]) for k, v in tune.items()}
    workers = _integer(spec, "workers", 1 if spec.workers is None else spec.workers, 1, 256)
    per_run = _integer(spec, "gpus_per_run", 1 if spec.gpus_per_run is None else spec.gpus_per_run, 1, 256)
    if spec.db is not None and (not isinstance(spec.db, str) or not spec.db.strip()):
        raise UserError(f"{_where(spec, 'db')} must be a store path or URL, got {spec.db!r}")
    return {"objectives": objectives, "samplers": samplers, "seeds": seeds, "suites": suites, "params": params, "tune": tune,
            "workers": workers, "gpus_per_run": per_run, "run": _run_options(spec)}


def expand(spec: SweepSpec) -> list[Job]:
    """Every job of the sweep, validated (unknown objectives, parameters, suites and run options
    are one-line errors), with its configuration hash and version label resolved."""
    from kdbench.errors import did_you_mean
    from kdbench.registry import get_objective

    checked = validate(spec)
    # normalised: run_sweep schedules with them
    spec.workers, spec.gpus_per_run, spec.run = checked["workers"], checked["gpus_per_run"], checked["run"]
    params, tune, seeds = checked["params"], checked["tune"], checked["seeds"]
    shared = from_flags(spec.run, "sweep")  # what every job's configuration shares
    bases = {}
    for name in checked["objectives"]:
        try:
            bases[name] = get_objective(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    declared = sorted({p.name for base in bases.values() for p in base.spec.params})
    for key in params:  # a grid no objective takes would silently run without it
        if key not in declared:
            why = (did_you_mean(key, declared, what="parameter") if declared
                   else "the sweep's objectives take no parameters")
            raise UserError(f"{_where(spec, 'params.' + key)}: no objective of the sweep declares it; {why}")
    from kdbench.engine.samplers import get_sampler

    # a mistake is refused here, before anything runs
    samplers = [(text, get_sampler(text)) for text in (checked["samplers"] or [shared.sampler])]
    jobs: list[Job] = []
    for suite_name in checked["suites"]:
        for name, base in bases.items():
            own = {k: v for k, v in params.items() if any(p.name == k for p in base.spec.params)}
            for combo in _grid(own):
                try:
                    obj = get_objective(name, **combo)
                except ValueError as exc:
                    raise UserError(str(exc)) from None
                for text, sampler in samplers:
                    if sampler.name != "off" and not obj.needs_teacher:
                        if checked["samplers"]:
                            continue  # ce beside on-policy samplers: its off-policy runs only (module docstring)
                        raise UserError(f"sampler {sampler.setting} needs an objective that uses the teacher; "
                                        f"objective {obj.setting} uses none (sweep it with --sampler off)")
                    for train in _grid(tune):
                        for seed in seeds:
                            grid = {k: str(v) for k, v in combo.items()}
                            config = dataclasses.replace(shared, objective=name, params=grid, suite=suite_name,
                                                         seed=seed, sampler=text, num_processes=spec.gpus_per_run,
                                                         **train)
                            _, label = resolve_suite(config)
                            jobs.append(Job(suite_name, name, grid, train, seed, run_key(config, obj, label),
                                            sampler.row(obj.setting), label, config))
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise UserError("the sweep names the same run twice (an alias and its setting?); remove the duplicate")
    return jobs


def sweep_id(jobs: list[Job]) -> str:
    """The same specification gives the same id, so a sweep started again continues itself."""
    return hashlib.sha256("\n".join(sorted(j.key for j in jobs)).encode()).hexdigest()[:12]
