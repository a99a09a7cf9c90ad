"""One run end to end: resolve → prepare (cached) → reference rows → teacher source → start-up
check → record → train → evaluate → record.

Everything the user can get wrong (objective, parameters, suite, pair, model paths, data
directory, store location) is checked before any model is loaded (kdbench/config.py), and the
start-up check runs before the run row is written, so a refused run touches nothing. Once the
run row exists, any failure marks it ``failed`` with the reason. What a suite's runs share is
built by kdbench/prepare.py; the loop is kdbench/engine/trainer.py.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time

import torch

from kdbench import provenance
from kdbench.config import RunRequest, resolve, resolve_suite, run_key  # noqa: F401  (RunRequest re-exported)
from kdbench.device import default_threads, inference_dtype, peak_memory_mb  # noqa: F401  (default_threads re-exported)
from kdbench.engine import teacher_cache
from kdbench.engine.batches import PackedBatches
from kdbench.engine.check import startup_check
from kdbench.engine.teacher import CachedTeacher, LiveTeacher
from kdbench.engine.trainer import TrainingDiverged, train
from kdbench.errors import RunFailed
from kdbench.evaluate import validation_score
from kdbench.losses import HIDDEN_CHUNK_SIZE
from kdbench.models import cache_dir
from kdbench.prepare import Prepared, prepare, reference_fingerprint
from kdbench.references import ensure_reference_rows, evaluate_all
from kdbench.store import ROLE_DISTILLED, RunWriter
from kdbench.suites import SuiteSpec

# The landed name of resolve_suite (kept for callers and tests).
effective_suite = resolve_suite


def teacher_cache_inputs(prep: Prepared, examples) -> dict:
    """What a teacher-cache entry depends on (kdbench/engine/teacher_cache.py: the key)."""
    t = prep.suite.train
    dtype = str(inference_dtype(prep.device, t.bf16_autocast)).replace("torch.", "")
    return {"teacher": prep.teacher_identity(), "data": teacher_cache.data_digest(examples),
            "max_prompt_tokens": t.max_prompt_tokens, "max_tokens": t.max_tokens,
            "system_prompt": prep.suite.system_prompt, "dtype": dtype, "device": prep.device.type}


def make_teacher_source(prep: Prepared, objective, kind: str, progress: bool = True):
    """``(source, description, seconds spent building a cache entry)`` for the run."""
    if not objective.needs_teacher:
        return None, {"kind": "none"}, 0.0
    if kind == "live":
        return LiveTeacher(prep.teacher()), {"kind": "live"}, 0.0
    examples = prep.train_examples()
    inputs = teacher_cache_inputs(prep, examples)
    key = teacher_cache.cache_key(inputs)
    entry, built_s = teacher_cache.get_or_build(key, inputs, prep.teacher, examples, prep.device, progress=progress)
    return CachedTeacher(entry, prep.device), {"kind": "cache", "key": key, "rows": entry.meta["n_rows"]}, built_s


def selection_rule(suite: SuiteSpec, n_valid: int) -> str:
    task = suite.valid_task
    decode = "greedy" if task.greedy else "sampled (seed 1)"
    return (f"best validation {task.headline} ({task.name}, {decode}, {n_valid} prompts) every "
            f"{suite.eval.valid_every} steps and at the last; ties: earliest")


def run(req: RunRequest, argv: list[str] | None = None) -> int:
    """Distil, evaluate and record one run; returns its run id."""
    objective, suite, label, engine = resolve(req)
    device = torch.device(req.device)
    cost: dict[str, float] = {}
    t_all = time.perf_counter()

    prep = prepare(suite, device, data_dir=req.data_dir, progress=req.progress)
    suite = prep.suite  # budgets in steps
    examples = prep.train_examples()
    cost["prepare_s"] = time.perf_counter() - t_all
    t = time.perf_counter()
    ref_ids = ensure_reference_rows(engine, prep, label, argv)
    cost["reference_rows_s"] = time.perf_counter() - t
    teacher, teacher_desc, cost["teacher_cache_build_s"] = make_teacher_source(prep, objective, req.teacher_source,
                                                                              req.progress)
    if teacher is None or teacher.kind == "cache":
        prep.release_teacher()  # training needs no teacher model; evaluation loads it again

    torch.manual_seed(req.seed)
    student = prep.new_student()
    batches = PackedBatches(examples, suite.train.batch_size, req.seed, prep.tokenizer.pad_token_id)
    t = time.perf_counter()
    first = PackedBatches(examples, suite.train.batch_size, req.seed, prep.tokenizer.pad_token_id)
    check = startup_check(student, objective, next(first).to(device), teacher, chunk_size=HIDDEN_CHUNK_SIZE)
    cost["startup_check_s"] = time.perf_counter() - t

    config = {
        "objective": objective.name, "params": objective.params, "setting": objective.setting,
        "objective_version": getattr(objective.spec, "version", None),
        "suite": suite.to_dict(), "suite_version": label, "seed": req.seed, "device": req.device,
        "torch_threads": torch.get_num_threads(), "teacher": prep.teacher_identity(),
        "teacher_path": str(prep.teacher_path), "teacher_source": teacher_desc,
        "data_order": batches.describe(), "startup_check": check.to_dict(), "reference_runs": ref_ids,
        "reference_fingerprint": reference_fingerprint(prep), "student_keep": prep.student_keep,
        "data_sources": prep.data_manifest, "sweep_id": req.sweep_id,
    }
    print("[kdbench] resolved configuration:\n" + json.dumps(config, indent=2, default=str))
    writer = RunWriter.start(engine, role=ROLE_DISTILLED, suite=suite.name, suite_version=label, seed=req.seed,
                             config=config, provenance=provenance.collect(argv), objective=objective.name,
                             params=objective.params, setting=objective.setting)
    writer.update(config_hash=run_key(objective, suite.name, label, req.seed), sweep_id=req.sweep_id)
    print(f"[kdbench] run {writer.run_id}: {objective.setting} for {suite.train.steps} steps "
          f"(teacher {teacher_desc['kind']}; start-up check passed: loss {check.loss_fast:.6g} == {check.loss_dense:.6g})")
    try:
        validate = None
        if suite.eval.valid_every:
            def validate(m):
                return validation_score(m, prep.tokenizer, prep.valid_inputs(), suite.eval, device,
                                        task=suite.valid_task)

        def log(step, point):
            writer.curve(step, point["loss"], terms=point["terms"], lr=point["lr"], tokens=point["tokens"],
                         elapsed_s=point["elapsed_s"])

        t = time.perf_counter()
        result = train(model=student, objective=objective, batches=batches, teacher=teacher, spec=suite.train,
                       device=device, log=log, validate=validate, valid_every=suite.eval.valid_every,
                       progress=req.progress)
        cost["train_s"] = result.train_time_s
        cost["validation_s"] = time.perf_counter() - t - result.train_time_s
        rule = selection_rule(suite, len(prep.valid_inputs().examples)) if validate is not None else result.selection_rule
        for step, score in result.valid_scores.items():
            writer.curve(step, None, split="valid", terms={suite.valid_task.headline: score})
        del teacher
        gc.collect()
        n_eval = sum(len(v) for v in prep.tests.values())
        print(f"[kdbench] trained {result.steps} steps in {result.train_time_s:.0f}s "
              f"({result.tokens_per_s:.0f} tok/s; checkpoint: step {result.selected_step}); evaluating "
              f"{len(suite.tasks)} task(s), {n_eval} prompts ...")
        t = time.perf_counter()
        student.requires_grad_(False)
        res = evaluate_all(student, prep)
        cost["evaluation_s"] = time.perf_counter() - t
        writer.metrics(res.metrics)
        writer.samples(res.samples)
        ckpt = save_student(student, prep.tokenizer, engine.url, writer.run_id) if req.save_student else None
        cost["wall_s"] = time.perf_counter() - t_all
        cost["peak_memory_mb"] = peak_memory_mb(device) or 0.0
        writer.artifact("cost", cost)
        writer.finish(wall_time_s=cost["wall_s"], train_tokens_per_s=result.tokens_per_s,
                      peak_memory_mb=cost["peak_memory_mb"], selection_rule=rule, selected_step=result.selected_step,
                      checkpoint_path=ckpt)
        print("[kdbench] cost: " + ", ".join(f"{k} {v:.0f}" for k, v in cost.items()))
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
    key = hashlib.sha256(str(db_url).encode()).hexdigest()[:10]
    out = cache_dir() / "students" / f"{key}-run{run_id}"
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
