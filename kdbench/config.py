"""A run's configuration and its resolution: which options a run has, and what is made of
them together (one option's declaration and the checked reading of its values are
kdbench/run_option.py's).

:class:`RunConfig` is the one place a run option is spelled. Each field carries an
:class:`~kdbench.run_option.Option` (its metadata): the flag with its argument type, metavar or
choices, the help text (which states the default written beside it), the commands that take it,
what a sweep does with it, whether it enters the run's identity and whether ``--resume`` takes
it. Derived from those, never written by hand: the options of ``kdbench run`` / ``prepare`` and
the sweep's "passed to every run" flags (kdbench/cli_parser.py), the ``--resume`` check
(kdbench/cli.py), the keys of a sweep file's ``run:`` mapping, the configuration a sweep hands
each job (JSON, :func:`to_json` / :func:`from_dict`) and the command line ``kdbench sweep
--dry-run`` prints for it (:func:`command_line`), the run's stored ``request``
(:func:`stored_request`) and the RunConfig a resumed run rebuilds from it, and :func:`run_key`.
Adding a run option is adding a field (docs/engine.md "Adding a run option").

``resolve(config)`` checks everything a user can get wrong, before any model is loaded or
anything is opened, and returns the objective, the suite with the config's overrides and the
version label its results are filed under (``2+steps=3,eval_limit=3`` for a quick run: never
ranked beside standard ones). It only reads. Opening (creating, migrating) the store is its own
step, :func:`open_store`, which a run takes right after resolving. The resolved
configuration of a run (``recipe.DistillRun.setup``) is built from these once, printed once and stored once;
:func:`run_key` hashes its identity, so two runs with one key are repeats of one experiment
(``runs.config_hash``; a sweep skips keys that already finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kdbench.data import sources
from kdbench.errors import UserError, did_you_mean
from kdbench.run_option import (COMMANDS, IDENTITY_ROLES, SEED_MAX, SWEEP_ROLES, Option, _count, _device_type,
                                _nonempty, _positive_float, _seed, json_value, option)
from kdbench.suites import PairSpec, SuiteSpec, get_suite


def _sampler_setting(text: str) -> str:
    """A sampler's canonical setting (``gkd`` -> ``gkd(lmbda=0.5)``): how the run key holds it."""
    from kdbench.engine.samplers import get_sampler

    return get_sampler(text).setting


@dataclass
class RunConfig:
    """Every option of a run. Field order is the order of ``kdbench run --help``."""

    objective: str | None = option(
        None, flag="--objective", metavar="NAME", sweep="vary", identity="objective",
        help="objective name or setting (see `kdbench list`; csd(tau=1.5)) or path/to/file.py:name "
             "(run: required unless --resume; prepare: kl when not given)")
    params: dict = option(
        default_factory=dict, flag="--param", metavar="KEY=VALUE", sweep="vary", identity="objective",
        help="objective parameter (repeatable; default: the objective's)")
    sampler: str = option(
        "off", flag="--sampler", metavar="NAME", identity="key", canonical=_sampler_setting,
        help="where training responses come from (see `kdbench list`): off (default: the dataset's), seqkd (the "
             "teacher's, generated once), imitkd (the student's samples), gkd(lmbda=0.5) (the student's with "
             "probability lmbda per step), distillm (DistiLLM's adaptive schedule with a replay buffer); on-policy "
             "samplers score the student's samples with the live teacher")
    suite: str = option(
        "micro", flag="--suite", sweep="vary", identity="key",
        help="benchmark suite (default: micro, the embedded CPU suite; see `kdbench list` and docs/suites.md)")
    seed: int = option(
        0, flag="--seed", type=_seed, sweep="vary", identity="key",
        help="training seed: data order and any randomness in training (default 0)")
    pair: str | None = option(
        None, flag="--pair", identity="label",
        help="a named teacher/student pair of the suite (default: its default pair)")
    teacher: str | None = option(
        None, flag="--teacher", metavar="PATH_OR_ID", identity="label",
        help="teacher model folder or hub id instead of the pair's (fine-tuned first when the suite fine-tunes "
             "its teacher)")
    teacher_finetuned: bool = option(
        False, flag="--teacher-finetuned", identity="label",
        help="--teacher is already fine-tuned for the suite: skip the teacher fine-tuning")
    student: str | None = option(
        None, flag="--student", metavar="PATH_OR_ID", identity="label",
        help="pretrained student folder or hub id instead of the pair's (same vocabulary as the teacher)")
    data_dir: str | None = option(
        None, flag="--data-dir", metavar="PATH", identity="label",
        help="data root for the paper suites, laid out like ../shared/data (default: $KDBENCH_DATA_DIR, else the "
             "hub)")
    steps: int | None = option(
        None, flag="--steps", type=_count, identity="label",
        help="optimiser steps (default: the suite's budget)")
    eval_limit: int | None = option(
        None, flag="--eval-limit", type=_count, identity="label",
        help="test prompts to evaluate (default: the suite's)")
    finetune_steps: int | None = option(
        None, flag="--finetune-steps", type=_count, identity="label",
        help="teacher fine-tuning steps for suites that fine-tune (default: the suite's; a quick run's label "
             "says so)")
    lr: float | None = option(
        None, flag="--lr", type=_positive_float, sweep="tune", identity="label",
        help="peak learning rate instead of the suite's (default: the suite's; filed under version+lr=X)")
    device: str = option(
        "auto", flag="--device", type=_device_type,
        help="auto (default): cuda when a CUDA device is available (the current GPU), else cpu; or cpu, cuda, "
             "cuda:N (a visible GPU). The run records the device it resolved to")
    deterministic: bool = option(
        False, flag="--deterministic",
        help="deterministic algorithms only (torch.use_deterministic_algorithms; on CUDA cuBLAS's workspace "
             ":4096:8): what makes a CUDA run repeat and resume bit for bit; refused in one line where it cannot be "
             "honoured (default: off; CPU runs repeat bit for bit either way: docs/engine.md \"Determinism\")")
    teacher_source: str = option(
        "cache", flag="--teacher-source", choices=("cache", "live"),
        help="cache (default): the teacher's hidden states computed once per suite version and read from disk; "
             "live: run the teacher on every batch")
    save_student: bool = option(
        True, flag="--no-save",
        help="do not keep the distilled student's weights (default: kept for `kdbench eval`)")
    keep_activations: bool = option(
        False, flag="--keep-activations",
        help="keep the student's activations for backward instead of recomputing them (default: recomputed): the "
             "same result bit for bit, less training time, more memory (docs/performance.md)")
    accumulation: int = option(
        1, flag="--accumulation", type=_count,
        help="micro-steps per optimiser step on each process (default 1): the step's batch is split further and "
             "the gradients add up, the step's loss over all its counted tokens, so the result is the same within "
             "float32 rounding with less memory")
    fsdp: bool = option(
        False, flag="--fsdp", commands=("run", "sweep"), sweep="every",
        help="on several processes (--num-processes / torchrun), shard the student across them with FSDP2 instead "
             "of replicating it (DDP): for a student whose training state does not fit one device; the teacher "
             "stays whole on each. The same training within float32 rounding; checkpoints are each rank's shards, "
             "resumed on as many processes (docs/engine.md \"Scale-out\")")
    num_processes: int = option(
        1, flag="--num-processes", type=_count, commands=("run",), sweep=None,
        help="train on N processes of this machine (default 1), started through torch.distributed.run (one GPU "
             "each on CUDA, gloo on the CPU; torchrun / accelerate launch -m kdbench run work too): the step is "
             "the suite's batch split across them, so the result is the one process's within float32 rounding; "
             "rank 0 prepares, writes and evaluates")
    db: str | None = option(
        None, flag="--db", type=_nonempty, commands=("run", "prepare"), sweep=None, resume=True,
        help="run store: path or SQLAlchemy URL (default: $KDBENCH_DB or runs.db)")
    progress: bool = option(
        True, flag="--no-progress", commands=("run", "prepare"), sweep=None, resume=True,
        help="no progress bar (default: one while training)")
    sweep_id: str | None = option(
        None, flag="--sweep-id", metavar="ID", commands=("run",), sweep=None,
        help="the `kdbench sweep` this run belongs to (set by kdbench sweep; default: none)")


def _kind(hint) -> type:
    """str / int / float / bool / dict from a field's type (``int | None`` -> int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin not in (str, int, float, bool, dict):
        raise TypeError(f"a run option is a str, int, float, bool or dict (--param), not {hint!r}")
    return origin


def options(command: str | None = None, cls: type | None = None) -> list[Option]:
    """The run options (of ``command``: run / prepare / sweep; None: all), in field order, each
    with its field's name, default and kind. ``cls``: the config class (default: this module's
    :class:`RunConfig`, read when called, so a field added to it -- a subclass put in its place --
    is everywhere at once)."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        o = f.metadata.get("option")
        if o is None:
            raise TypeError(f"RunConfig.{f.name} has no option(...) metadata (flag, help, ...)")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        o = dataclasses.replace(o, name=f.name, default=default, kind=_kind(hints[f.name]))
        if o.sweep not in SWEEP_ROLES or o.identity not in IDENTITY_ROLES or not set(o.commands) <= set(COMMANDS) \
                or ("sweep" in o.commands) != (o.sweep is not None) or (o.resume and o.identity):
            raise TypeError(f"RunConfig.{f.name}: inconsistent option metadata {o}")
        if command is None or command in o.commands:
            out.append(o)
    return out


def option_named(name: str) -> Option:
    return next(o for o in options() if o.name == name)


# ---------------------------------------------------------------------------------------------
# Building a RunConfig: from flags, from a file's values, from JSON or a stored request
# ---------------------------------------------------------------------------------------------


def from_flags(values: Mapping[str, Any], command: str = "run") -> RunConfig:
    """A RunConfig from flag values keyed by :attr:`Option.key` (argparse's namespace holds only
    the flags given; a sweep file's ``run:`` mapping); the rest are the fields' defaults."""
    by_key = {o.key: o for o in options(command)}
    return RunConfig(**{by_key[k].name: by_key[k].field_value(v) for k, v in values.items()})


def given_flags(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The run options given on the command line (their flags' defaults are ``SUPPRESS``: absent
    from the namespace unless given, so ``--seed 0`` counts as given)."""
    return {o.key: getattr(args, o.key) for o in options(command) if hasattr(args, o.key)}




def from_dict(values: Mapping[str, Any], where: str, **given) -> RunConfig:
    """A RunConfig from its fields' values (a job's JSON, a run's stored ``request``), each
    checked; ``given`` replaces fields (a resume's store and progress bar). A key this kdbench
    does not know (written by a newer one) is refused in one line; a missing key (written by an
    older one) is the field's default."""
    if not isinstance(values, Mapping):
        raise UserError(f"{where} is not a run configuration (a mapping of options), got {type(values).__name__}")
    known = {o.name: o for o in options()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{where} has option(s) this kdbench does not know ({', '.join(map(str, unknown))}): it was "
                        f"written by a newer kdbench; use that one")
    kw = {k: json_value(known[k], v, f"{where}: {k}") for k, v in values.items()}
    return RunConfig(**{**kw, **given})


def to_json(config: RunConfig) -> str:
    """The whole configuration, as :func:`from_dict` reads it back (a sweep's hand-off to a job)."""
    return json.dumps(dataclasses.asdict(config), indent=1)


def stored_request(config: RunConfig) -> dict:
    """What a run stores of its configuration (``config["request"]``): every option but those
    of the command rather than the run (``--resume`` takes them: the store, the progress bar)."""
    return {o.name: getattr(config, o.name) for o in options(cls=type(config)) if not o.resume}


def command_line(config: RunConfig, command: str = "run") -> list[str]:
    """``kdbench <command> ...`` giving exactly ``config``: what a sweep varies always, any other
    option where it differs from its default (``kdbench sweep --dry-run`` prints these)."""
    argv = ["kdbench", command]
    for o in options(command, cls=type(config)):
        argv += o.argv(getattr(config, o.name), always=o.sweep == "vary")
    return argv


def _model_ref(flag: str, value: str | None) -> str | None:
    """A local model folder (made absolute) or a hub id (kept as given)."""
    if not value:
        return None
    p = Path(value).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if value.startswith((".", "/", "~")):
        raise UserError(f"{flag} {value}: no such model folder")
    return value


def _short(name: str) -> str:
    return Path(name.rstrip("/")).name or name


def resolve_suite(req: RunConfig) -> tuple[SuiteSpec, str]:
    """The suite with the config's overrides, and the version label results are filed under.
    A run with a non-standard pair, model, budget or stand-in data is not comparable to
    standard ones, so its label says so (``2+pair=...,steps=3,data=standin``)."""
    suite = get_suite(req.suite)
    overrides = {}
    if req.pair is not None:
        if req.pair not in suite.pairs:
            raise UserError(did_you_mean(req.pair, sorted(suite.pairs), what=f"pair for suite {suite.name}"))
        if req.pair != suite.default_pair:
            overrides["pair"] = req.pair
        suite = dataclasses.replace(suite, pair=req.pair)
    if req.teacher_finetuned and not req.teacher:
        raise UserError("--teacher-finetuned needs --teacher (the already fine-tuned teacher)")
    if req.teacher_finetuned and suite.finetune is None:
        raise UserError(f"suite {suite.name} does not fine-tune its teacher; drop --teacher-finetuned")
    if req.teacher or req.student:
        teacher, student = _model_ref("--teacher", req.teacher), _model_ref("--student", req.student)
        sel = suite.selected
        custom = PairSpec(teacher=teacher or sel.teacher,
                          student={"kind": "pretrained", "name": student} if student else sel.student,
                          teacher_finetuned=req.teacher_finetuned if req.teacher else sel.teacher_finetuned,
                          note="given on the command line")
        suite = dataclasses.replace(suite, pairs={**suite.pairs, "custom": custom}, pair="custom")
        if req.teacher:
            overrides["teacher"] = _short(req.teacher) + ("(finetuned)" if req.teacher_finetuned else "")
        if req.student:
            overrides["student"] = _short(req.student)
    if req.finetune_steps is not None:
        if suite.finetune is None or req.teacher_finetuned:
            raise UserError(f"suite {suite.name} does not fine-tune its teacher here; drop --finetune-steps")
        if req.finetune_steps < 1:
            raise UserError("--finetune-steps must be at least 1")
        suite = dataclasses.replace(suite, finetune=dataclasses.replace(suite.finetune, steps=req.finetune_steps,
                                                                        epochs=None))
        overrides["finetune_steps"] = req.finetune_steps
    if req.steps is not None and (req.steps != suite.train.steps or suite.train.epochs):
        if req.steps < 1:
            raise UserError("--steps must be at least 1")
        suite = dataclasses.replace(suite, train=dataclasses.replace(suite.train, steps=req.steps, epochs=None))
        overrides["steps"] = req.steps
    if req.lr is not None and req.lr != suite.train.lr:
        if not req.lr > 0:
            raise UserError("--lr must be positive")
        suite = dataclasses.replace(suite, train=dataclasses.replace(suite.train, lr=float(req.lr)))
        overrides["lr"] = f"{float(req.lr):g}"
    if req.eval_limit is not None and req.eval_limit != suite.eval.n_test:
        if req.eval_limit < 1:
            raise UserError("--eval-limit must be at least 1")
        suite = dataclasses.replace(suite, eval=dataclasses.replace(suite.eval, n_test=req.eval_limit,
                                                                    n_valid=min(suite.eval.n_valid, req.eval_limit)))
        overrides["eval_limit"] = req.eval_limit
    if sources.uses_data_root(suite):
        plan = sources.plan(suite, sources.data_root(req.data_dir))
        missing = [m for where in plan.values() for m in where.get("missing", [])]
        if missing:
            raise UserError(f"suite {suite.name}: data not found in the data directory: {', '.join(missing)}")
        if any(where.get("standin") for where in plan.values()):
            overrides["data"] = "standin"
    elif req.data_dir:
        raise UserError(f"suite {suite.name} has embedded data; --data-dir applies to the paper suites")
    label = suite.version + ("+" + ",".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")
    return suite, label


def resolve(config: RunConfig):
    """Everything a user can get wrong, checked before anything is opened or loaded: returns
    (objective, suite, label). Reads only: the store is :func:`open_store`'s."""
    from kdbench.device import check_deterministic, resolve_device
    from kdbench.distributed import from_env
    from kdbench.engine.check import check_contract_early
    from kdbench.engine.samplers import get_sampler
    from kdbench.diskcache import cache_home
    from kdbench.registry import get_objective

    if config.objective is None:
        raise UserError("the following arguments are required: --objective")
    if not 0 <= int(config.seed) <= SEED_MAX:
        raise UserError(f"--seed must be in [0, {SEED_MAX}], got {config.seed}")
    try:
        objective = get_objective(config.objective, **config.params)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_contract_early(objective)  # a broken plug-in is refused before reference rows are written
    sampler = get_sampler(config.sampler)
    if sampler.name != "off" and not objective.needs_teacher:
        what = ("trains on the teacher's generated responses, scored by the teacher" if sampler.name == "seqkd"
                else "trains on the student's samples scored by the teacher")
        raise UserError(f"sampler {sampler.setting} {what}; objective {objective.setting} uses no teacher "
                        f"(use --sampler off, or an objective that uses the teacher)")
    suite, label = resolve_suite(config)
    world = from_env()
    if config.fsdp and config.num_processes < 2 and not world.launched:
        raise UserError("--fsdp shards the student across processes: give --num-processes N (N >= 2), or start "
                        "kdbench run under torchrun / accelerate launch")
    processes = max(config.num_processes, world.size)
    shares = config.accumulation * processes
    if shares > suite.train.batch_size:
        raise UserError(f"{processes} process(es) x --accumulation "
                        f"{config.accumulation} = {shares} parts of a step; suite {suite.name}'s batch has only "
                        f"{suite.train.batch_size} examples")
    check_deterministic(resolve_device(config.device), config.deterministic)
    if config.teacher_source not in ("cache", "live"):
        raise UserError(f"unknown teacher source {config.teacher_source!r}; valid choices: cache, live")
    cache_home()  # a bad $KDBENCH_CACHE is refused before the store is opened (and perhaps created)
    return objective, suite, label


def open_store(config: RunConfig):
    """The run's store (``--db``, else ``$KDBENCH_DB``, else ./runs.db), opened for writing:
    created or migrated where needed. A run's step right after :func:`resolve`, before any
    model is loaded; a store that cannot be written is refused in one line."""
    from kdbench.store import open_engine

    return open_engine(config.db)


#: The identity every run key holds; options with identity "key" beyond these enter it only
#: where they differ from their default, so adding an option never changes an existing run's key.
_BASE_IDENTITY = ("objective", "objective_version", "params", "suite", "suite_version", "seed")


def run_key(config: RunConfig, objective, label: str) -> str:
    """The identity of an experiment: the resolved objective (name, version, parameters), the
    suite, the version label (every option with identity "label") and the options with identity
    "key" (the training seed; an option added later where it is not its default). Equal keys are
    repeats; the device, determinism, the teacher source and the code version are provenance, not
    identity. The device stays out on purpose: a run on a GPU is the same experiment as on a CPU
    (objective, suite, budget, seed); *where* it ran is its teacher group -- the reference
    fingerprint holds the device kind and precision policy (kdbench/prepare.py) -- and a sweep's
    skip of finished runs and the leaderboard's grouping key on both, so a GPU run is never
    counted as its CPU twin. Keeping it out also keeps every committed run's key as it was."""
    ident = {"objective": objective.name, "objective_version": getattr(objective.spec, "version", 1),
             "params": objective.params, "suite": config.suite, "suite_version": label, "seed": int(config.seed)}
    for o in options(cls=type(config)):
        value = getattr(config, o.name)
        if o.canonical is not None:
            value = o.canonical(value)
        if o.identity == "key" and o.name not in _BASE_IDENTITY and value != o.default:
            ident[o.name] = value
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]
