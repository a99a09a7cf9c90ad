"""One run end to end: resolve → prepare (cached) → reference rows → distil → evaluate → record.

Everything the user can get wrong (objective, parameters, suite, store location) is checked
before any model is loaded or any row is written, so a mistake costs nothing and touches
nothing. Once the run row exists, any failure marks it ``failed`` with the reason.
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
from kdbench.data.batching import batches, encode
from kdbench.data.micro import build_splits
from kdbench.errors import RunFailed, UserError
from kdbench.evaluate import evaluate_model, validation_score
from kdbench.models import build_student, cache_dir, fingerprint, layer_subset, load_causal_lm, load_tokenizer, \
    prepare_teacher
from kdbench.store import ROLE_DISTILLED, ROLE_STUDENT_INIT, ROLE_TEACHER, RunWriter, find_reference_run, open_engine
from kdbench.suites import SuiteSpec, get_suite
from kdbench.train import TrainingDiverged, distill, native_bf16


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


@dataclass
class Prepared:
    """Everything a suite's runs share, built once per process (and cached on disk)."""

    suite: SuiteSpec
    teacher_path: Path
    tokenizer: object
    teacher: torch.nn.Module
    splits: dict
    student_keep: list[int]

    def new_student(self) -> torch.nn.Module:
        """A fresh float32 student (the teacher in memory may be bf16: it only runs inference)."""
        return build_student(load_causal_lm(self.teacher_path), self.student_keep)


def effective_suite(req: RunRequest) -> tuple[SuiteSpec, str]:
    """The suite with the request's overrides, and the version label results are filed under.
    A run with a non-standard budget is not comparable to standard ones, so its label says so."""
    suite = get_suite(req.suite)
    overrides = {}
    if req.steps is not None and req.steps != suite.train.steps:
        if req.steps < 1:
            raise UserError("--steps must be at least 1")
        suite = dataclasses.replace(suite, train=dataclasses.replace(suite.train, steps=req.steps))
        overrides["steps"] = req.steps
    if req.eval_limit is not None and req.eval_limit != suite.eval.n_test:
        if req.eval_limit < 1:
            raise UserError("--eval-limit must be at least 1")
        suite = dataclasses.replace(suite, eval=dataclasses.replace(suite.eval, n_test=req.eval_limit,
                                                                    n_valid=min(suite.eval.n_valid, req.eval_limit)))
        overrides["eval_limit"] = req.eval_limit
    label = suite.version + ("+" + ",".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")
    return suite, label


def prepare(suite: SuiteSpec, device: torch.device) -> Prepared:
    t0 = time.perf_counter()
    teacher_path = prepare_teacher(suite.teacher)
    tokenizer = load_tokenizer(teacher_path)
    # The frozen teacher only runs inference: hold it in bf16 where bf16 is native, so neither
    # training nor sampling pays autocast's per-call weight casts (they are not cached for
    # parameters that do not require grad).
    dtype = torch.bfloat16 if suite.train.bf16_autocast and native_bf16(device) else torch.float32
    teacher = load_causal_lm(teacher_path, dtype=dtype).to(device).eval().requires_grad_(False)
    if suite.data["loader"] != "micro":
        raise UserError(f"suite {suite.name!r} uses data loader {suite.data['loader']!r}, not available here")
    splits = build_splits(suite.data["valid_frac"], suite.data["test_frac"])
    keep = layer_subset(teacher.config.num_hidden_layers, suite.student["keep_every"])
    print(f"[kdbench] prepared {suite.name}: teacher {teacher_path} ({time.perf_counter() - t0:.1f}s), "
          f"data train/valid/test = {len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])}, "
          f"student keeps blocks {keep}")
    return Prepared(suite, teacher_path, tokenizer, teacher, splits, keep)


def test_examples(prep: Prepared) -> list:
    return sorted(prep.splits["test"], key=lambda e: e.id)[: prep.suite.eval.n_test]


def reference_fingerprint(prep: Prepared) -> str:
    return fingerprint(prep.teacher_path, {"student": prep.suite.student, "eval": dataclasses.asdict(prep.suite.eval),
                                           "data": prep.suite.data})


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
                  "teacher_path": str(prep.teacher_path), "student_keep": prep.student_keep}
        writer = RunWriter.start(engine, role=role, suite=prep.suite.name, suite_version=version_label, seed=0,
                                 config=config, provenance=provenance.collect(argv), setting=role)
        print(f"[kdbench] evaluating the {role} reference once for suite {prep.suite.name} v{version_label} ...")
        try:
            res = evaluate_model(model, teacher=prep.teacher, tokenizer=prep.tokenizer, examples=test_examples(prep),
                                 task=prep.suite.tasks[0], spec=prep.suite.eval, device=device,
                                 max_prompt_tokens=prep.suite.train.max_prompt_tokens,
                                 max_tokens=prep.suite.train.max_tokens, is_teacher=role == ROLE_TEACHER)
            writer.metrics(res.metrics)
            writer.samples(res.samples)
            writer.finish(wall_time_s=time.perf_counter() - t0)
        except BaseException as exc:
            writer.fail(f"{type(exc).__name__}: {exc}")
            raise
        ids[role] = writer.run_id
    return ids


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

    prep = prepare(suite, device)
    ref_ids = ensure_reference_rows(engine, prep, label, device, argv)
    config.update(reference_runs=ref_ids, reference_fingerprint=reference_fingerprint(prep), teacher_path=str(prep.teacher_path), student_keep=prep.student_keep)
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
        validate = (lambda m: validation_score(m, tok, valid, suite.eval, device, suite.train.max_prompt_tokens)) \
            if suite.eval.valid_every else None

        def log(step, point):
            writer.curve(step, point["loss"], terms=point["terms"], lr=point["lr"], tokens=point["tokens"],
                         elapsed_s=point["elapsed_s"])

        result = distill(teacher=prep.teacher, student=student, objective=objective,
                         batches=batches(train_enc, suite.train.batch_size, req.seed, tok.pad_token_id),
                         spec=suite.train, device=device, log=log, validate=validate,
                         valid_every=suite.eval.valid_every, progress=req.progress)
        for step, score in result.valid_scores.items():
            writer.curve(step, None, split="valid", terms={"rougeL": score})
        print(f"[kdbench] trained {result.steps} steps in {result.wall_time_s:.0f}s "
              f"({result.tokens_per_s:.0f} tok/s); evaluating on {len(test_examples(prep))} prompts "
              f"x {len(suite.eval.seeds)} seeds ...")
        res = evaluate_model(student, teacher=prep.teacher, tokenizer=tok, examples=test_examples(prep),
                             task=suite.tasks[0], spec=suite.eval, device=device,
                             max_prompt_tokens=suite.train.max_prompt_tokens, max_tokens=suite.train.max_tokens)
        writer.metrics(res.metrics)
        writer.samples(res.samples)
        ckpt = save_student(student, tok, engine.url, writer.run_id) if req.save_student else None
        writer.finish(wall_time_s=time.perf_counter() - t0, train_tokens_per_s=result.tokens_per_s,
                      peak_memory_mb=result.peak_memory_mb, selection_rule=result.selection_rule,
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
