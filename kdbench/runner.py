"""One run end to end: resolve → prepare (cached) → reference rows → distil → evaluate → record.

Everything the user can get wrong (objective, parameters, suite, pair, model paths, data
directory, store location) is checked before any model is loaded or any row is written, so
a mistake costs nothing and touches nothing. Once the run row exists, any failure marks it
``failed`` with the reason. What a suite's runs share is built by kdbench/prepare.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench import provenance
from kdbench.data import sources
from kdbench.data.batching import batches, encode
from kdbench.errors import RunFailed, UserError, did_you_mean
from kdbench.evaluate import EvalResult, evaluate_model, validation_score
from kdbench.models import cache_dir
from kdbench.prepare import Prepared, prepare, reference_fingerprint  # noqa: F401  (re-exported)
from kdbench.store import ROLE_DISTILLED, ROLE_STUDENT_INIT, ROLE_TEACHER, RunWriter, find_reference_run, open_engine
from kdbench.suites import PairSpec, SuiteSpec, get_suite
from kdbench.train import TrainingDiverged, distill


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


def effective_suite(req: RunRequest) -> tuple[SuiteSpec, str]:
    """The suite with the request's overrides, and the version label results are filed under.
    A run with a non-standard pair, model, budget or stand-in data is not comparable to
    standard ones, so its label says so (``1+pair=...,steps=3,data=standin``)."""
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
    if req.steps is not None and (req.steps != suite.train.steps or suite.train.epochs):
        if req.steps < 1:
            raise UserError("--steps must be at least 1")
        suite = dataclasses.replace(suite, train=dataclasses.replace(suite.train, steps=req.steps, epochs=None))
        overrides["steps"] = req.steps
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


def ensure_reference_rows(engine, prep: Prepared, version_label: str, device: torch.device, argv) -> dict[str, int]:
    """Evaluate the teacher and the undistilled student once per suite version and model pair."""
    fp = reference_fingerprint(prep)
    ids = {}
    for role in (ROLE_TEACHER, ROLE_STUDENT_INIT):
        found = find_reference_run(engine, role, prep.suite.name, version_label, fp)
        if found is not None:
            ids[role] = found.id
            continue
        t0 = time.perf_counter()
        model = prep.teacher if role == ROLE_TEACHER else prep.new_student().to(device)
        config = {"suite": prep.suite.to_dict(), "reference_fingerprint": fp, "role": role,
                  "teacher_path": str(prep.teacher_path), "student_keep": prep.student_keep,
                  "data_sources": prep.data_manifest}
        writer = RunWriter.start(engine, role=role, suite=prep.suite.name, suite_version=version_label, seed=0,
                                 config=config, provenance=provenance.collect(argv), setting=role)
        print(f"[kdbench] evaluating the {role} reference once for suite {prep.suite.name} v{version_label} ...")
        try:
            res = evaluate_all(model, prep, device, is_teacher=role == ROLE_TEACHER)
            writer.metrics(res.metrics)
            writer.samples(res.samples)
            writer.finish(wall_time_s=time.perf_counter() - t0)
        except BaseException as exc:
            writer.fail(f"{type(exc).__name__}: {exc}")
            raise
        ids[role] = writer.run_id
    return ids


def evaluate_all(model, prep: Prepared, device: torch.device, is_teacher: bool = False) -> EvalResult:
    """Every task of the suite, one after the other, into one result."""
    out = EvalResult()
    for task in prep.suite.tasks:
        res = evaluate_model(model, teacher=prep.teacher, tokenizer=prep.tokenizer, examples=prep.tests[task.name],
                             task=task, spec=prep.suite.eval, device=device,
                             max_prompt_tokens=prep.suite.train.max_prompt_tokens,
                             max_tokens=prep.suite.train.max_tokens, is_teacher=is_teacher)
        out.metrics += res.metrics
        out.samples += res.samples
    return out


def resolve(req: RunRequest):
    """All user-facing validation, before anything heavy happens."""
    from kdbench.registry import get_objective

    try:
        objective = get_objective(req.objective, **req.params)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    suite, label = effective_suite(req)
    if req.device not in ("cpu",) and not req.device.startswith("cuda"):
        raise UserError(f"unknown device {req.device!r}; valid choices: cpu, cuda, cuda:N")
    if req.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {req.device!r} requested but no CUDA device is available")
    engine = open_engine(req.db)
    return objective, suite, label, engine


def selection_rule(suite: SuiteSpec, n_valid: int) -> str:
    task = suite.valid_task
    decode = "greedy" if task.greedy else "sampled (seed 1)"
    return (f"best validation {task.headline} ({task.name}, {decode}, {n_valid} prompts) every "
            f"{suite.eval.valid_every} steps and at the last; ties: earliest")


def run(req: RunRequest, argv: list[str] | None = None) -> int:
    """Distil, evaluate and record one run; returns its run id."""
    objective, suite, label, engine = resolve(req)
    device = torch.device(req.device)
    torch.manual_seed(req.seed)
    config = {
        "objective": objective.name, "params": objective.params, "setting": objective.setting,
        "objective_version": getattr(objective.spec, "version", None),
        "suite": suite.to_dict(), "suite_version": label, "seed": req.seed, "device": req.device,
        "torch_threads": torch.get_num_threads(),
    }
    print("[kdbench] resolved configuration:\n" + json.dumps(config, indent=2, default=str))

    prep = prepare(suite, device, data_dir=req.data_dir, progress=req.progress)
    suite = prep.suite  # budgets in steps
    ref_ids = ensure_reference_rows(engine, prep, label, device, argv)
    config.update(suite=suite.to_dict(), reference_runs=ref_ids, reference_fingerprint=reference_fingerprint(prep),
                  teacher_path=str(prep.teacher_path), student_keep=prep.student_keep,
                  data_sources=prep.data_manifest)
    writer = RunWriter.start(engine, role=ROLE_DISTILLED, suite=suite.name, suite_version=label, seed=req.seed,
                             config=config, provenance=provenance.collect(argv), objective=objective.name,
                             params=objective.params, setting=objective.setting)
    print(f"[kdbench] run {writer.run_id}: distilling with {objective.setting} for {suite.train.steps} steps")
    try:
        t0 = time.perf_counter()
        torch.manual_seed(req.seed)
        student = prep.new_student().to(device)
        tok = prep.tokenizer
        train_enc = [encode(tok, e.prompt, e.references[0], suite.train.max_prompt_tokens, suite.train.max_tokens)
                     for e in prep.splits["train"]]
        valid = sorted(prep.splits["valid"], key=lambda e: e.id)[: suite.eval.n_valid]
        validate = None
        if suite.eval.valid_every:
            def validate(m):
                return validation_score(m, tok, valid, suite.eval, device, suite.train.max_prompt_tokens,
                                        task=suite.valid_task)

        def log(step, point):
            writer.curve(step, point["loss"], terms=point["terms"], lr=point["lr"], tokens=point["tokens"],
                         elapsed_s=point["elapsed_s"])

        result = distill(teacher=prep.teacher, student=student, objective=objective,
                         batches=batches(train_enc, suite.train.batch_size, req.seed, tok.pad_token_id),
                         spec=suite.train, device=device, log=log, validate=validate,
                         valid_every=suite.eval.valid_every, progress=req.progress)
        rule = selection_rule(suite, len(valid)) if validate is not None else result.selection_rule
        for step, score in result.valid_scores.items():
            writer.curve(step, None, split="valid", terms={suite.valid_task.headline: score})
        n_eval = sum(len(v) for v in prep.tests.values())
        print(f"[kdbench] trained {result.steps} steps in {result.wall_time_s:.0f}s "
              f"({result.tokens_per_s:.0f} tok/s; checkpoint: step {result.selected_step}); evaluating "
              f"{len(suite.tasks)} task(s), {n_eval} prompts ...")
        res = evaluate_all(student, prep, device)
        writer.metrics(res.metrics)
        writer.samples(res.samples)
        ckpt = save_student(student, tok, engine.url, writer.run_id) if req.save_student else None
        writer.finish(wall_time_s=time.perf_counter() - t0, train_tokens_per_s=result.tokens_per_s,
                      peak_memory_mb=result.peak_memory_mb, selection_rule=rule,
                      selected_step=result.selected_step, checkpoint_path=ckpt)
    except KeyboardInterrupt:
        writer.fail("interrupted by the user")
        raise
    except TrainingDiverged as exc:
        writer.fail(f"diverged: {exc}")
        raise RunFailed(f"run {writer.run_id} failed: diverged: {exc} (recorded as failed)") from None
    except Exception as exc:
        writer.fail(f"{type(exc).__name__}: {exc}")
        raise RunFailed(f"run {writer.run_id} failed: {type(exc).__name__}: {exc} (recorded as failed)") from exc
    return writer.run_id


def test_examples(prep: Prepared, task: str | None = None) -> list:
    """The evaluated test examples of a task (default: the first)."""
    return prep.tests[task or prep.suite.tasks[0].name]


def save_student(student, tokenizer, db_url, run_id: int) -> str:
    """The distilled student as a transformers folder in the cache (never in the repo), keyed by
    store and run id so several stores never share a folder."""
    import hashlib

    key = hashlib.sha256(str(db_url).encode()).hexdigest()[:10]
    out = cache_dir() / "students" / f"{key}-run{run_id}"
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def default_threads() -> None:
    """Use every core unless the user pinned a number (torch defaults to physical cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
