"""The run request and its resolution: everything a user can get wrong is checked here, before
any model is loaded or any row is written.

``resolve(request)`` returns the objective, the suite with the request's overrides and the
version label its results are filed under (``2+steps=3,eval_limit=3`` for a quick run: never
ranked beside standard ones). The resolved configuration of a run (``runner.run``) is built
from these once, printed once and stored once; :func:`run_key` hashes its identity, so two
runs with one key are repeats of one experiment (``runs.config_hash``; a sweep skips keys that
already finished).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kdbench.data import sources
from kdbench.errors import UserError, did_you_mean
from kdbench.suites import PairSpec, SuiteSpec, get_suite

MAX_SEED = 2**32 - 1


@dataclass
class RunRequest:
    objective: str
    params: dict
    suite: str = "micro"
    seed: int = 0                  # training seed: data order and any randomness in training
    steps: int | None = None       # None: the suite's budget
    eval_limit: int | None = None  # None: the suite's number of test prompts
    db: str | None = None          # path or SQLAlchemy URL; None: $KDBENCH_DB or ./runs.db
    device: str = "cpu"
    save_student: bool = True      # keep the distilled student (safetensors) for `kdbench eval`
    progress: bool = True
    pair: str | None = None        # a named pair of the suite (None: its default pair)
    teacher: str | None = None     # a teacher folder or hub id instead of the pair's
    student: str | None = None     # a pretrained student folder or hub id instead of the pair's
    teacher_finetuned: bool = False  # --teacher is already fine-tuned for the suite: skip teacher SFT
    data_dir: str | None = None    # data root for paper suites (None: $KDBENCH_DATA_DIR, else the hub)
    teacher_source: str = "cache"  # "cache": the exact teacher cache (off-policy); "live": run the teacher each step
    sweep_id: str | None = None    # the `kdbench sweep` this run belongs to
    lr: float | None = None        # peak learning rate instead of the suite's (`kdbench sweep --tune lr=...`)
    finetune_steps: int | None = None  # teacher fine-tuning budget instead of the suite's (quick runs, tests)
    keep_activations: bool = False  # keep the student's block activations for backward instead of recomputing
    #                                 them: bitwise the same result, less time, more memory (sweeps on big machines)


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


def resolve_suite(req: RunRequest) -> tuple[SuiteSpec, str]:
    """The suite with the request's overrides, and the version label results are filed under.
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


def resolve(req: RunRequest):
    """All user-facing validation, before anything heavy happens: (objective, suite, label, engine)."""
    from kdbench.device import resolve_device
    from kdbench.engine.check import check_contract_early
    from kdbench.models import cache_home
    from kdbench.registry import get_objective
    from kdbench.store import open_engine

    if not 0 <= int(req.seed) <= MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED}], got {req.seed}")
    try:
        objective = get_objective(req.objective, **req.params)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_contract_early(objective)  # a broken plug-in is refused before reference rows are written
    suite, label = resolve_suite(req)
    resolve_device(req.device)
    if req.teacher_source not in ("cache", "live"):
        raise UserError(f"unknown teacher source {req.teacher_source!r}; valid choices: cache, live")
    cache_home()  # a bad $KDBENCH_CACHE is refused before the store is opened (and perhaps created)
    engine = open_engine(req.db)
    return objective, suite, label, engine


def run_key(objective, suite_name: str, label: str, seed: int) -> str:
    """The identity of an experiment: objective name, version and parameters, suite, version
    label and training seed. Equal keys are repeats; the device, the teacher source and the
    code version are provenance, not identity."""
    ident = {"objective": objective.name, "objective_version": getattr(objective.spec, "version", 1),
             "params": objective.params, "suite": suite_name, "suite_version": label, "seed": int(seed)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]
