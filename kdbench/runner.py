"""One run end to end: resolve → prepare (cached) → reference rows → teacher source → start-up
check → record → train (checkpointed) → evaluate → record.

Everything the user can get wrong (objective, parameters, suite, pair, model paths, data
directory, store location) is checked before any model is loaded (kdbench/config.py), and the
start-up check runs before the run row is written, so a refused run touches nothing. Once the
run row exists, any failure marks it ``failed`` with the reason; Ctrl-C, SIGTERM or a lost
process leave it ``interrupted`` with its last checkpoint, and ``kdbench run --resume ID``
continues it to the same result. What a suite's runs share is built by kdbench/prepare.py;
the loop is kdbench/engine/trainer.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdbench import provenance
from kdbench.config import RunConfig, open_store, resolve, run_key, stored_request
from kdbench.device import default_threads, inference_dtype, peak_memory_mb, release_memory  # noqa: F401
from kdbench.diskcache import cache_dir
from kdbench.engine import state as train_state
from kdbench.engine import teacher_cache, trainer
from kdbench.engine.batches import PackedBatches
from kdbench.engine.check import startup_check
from kdbench.engine.teacher import CachedTeacher, LiveTeacher
from kdbench.engine.trainer import TrainingDiverged, make_optimizer, train
from kdbench.errors import RunFailed
from kdbench.evaluation.protocol import validation_score
from kdbench.lifecycle import GRACEFUL, Heartbeat, this_host
from kdbench.losses import HIDDEN_CHUNK_SIZE
from kdbench.prepare import Prepared, prepare, reference_fingerprint
from kdbench.references import ensure_reference_rows, evaluate_all
from kdbench.store import ROLE_DISTILLED, OwnershipLost, RunWriter, utcnow
from kdbench.suites import SuiteSpec

#: Save the train state after this many seconds of training (and at its end, and on SIGTERM);
#: ``$KDBENCH_CHECKPOINT_EVERY_S`` overrides it (0: after every step).
CHECKPOINT_EVERY_S = 120.0


def teacher_cache_inputs(prep: Prepared, examples) -> dict:
    """What a teacher-cache entry depends on (kdbench/engine/teacher_cache.py: the key)."""
    t = prep.suite.train
    dtype = str(inference_dtype(prep.device, t.bf16_autocast)).replace("torch.", "")
    return {"teacher": prep.teacher_identity(), "data": teacher_cache.data_digest(examples),
            "max_prompt_tokens": t.max_prompt_tokens, "max_tokens": t.max_tokens,
            "system_prompt": prep.suite.system_prompt, "dtype": dtype, "device": prep.device.type}


def examples_to_cache(examples, spec, seed: int) -> list:
    """The training examples a run's batches touch: all of them when the run covers at least
    half the training set (one entry shared by every seed and objective), else just those
    (a quick ``--steps N`` run caches a few batches, not the suite)."""
    if spec.steps * spec.batch_size >= len(examples) // 2:
        return list(examples)
    src = PackedBatches(examples, spec.batch_size, seed)
    touched: set[str] = set()
    for _ in range(spec.steps):
        touched.update(next(src).example_ids)
    return [(i, e) for i, e in examples if i in touched]


def make_teacher_source(prep: Prepared, objective, kind: str, seed: int = 0, progress: bool = True):
    """``(source, description, seconds spent building a cache entry)`` for the run."""
    if not objective.needs_teacher:
        return None, {"kind": "none"}, 0.0
    if kind == "live":
        return LiveTeacher(prep.teacher()), {"kind": "live"}, 0.0
    examples = examples_to_cache(prep.train_examples(), prep.suite.train, seed)
    inputs = teacher_cache_inputs(prep, examples)
    key = teacher_cache.cache_key(inputs)
    entry, built_s = teacher_cache.get_or_build(key, inputs, prep.teacher, examples, prep.device, progress=progress)
    return (CachedTeacher(entry, prep.device),
            {"kind": "cache", "key": key, "rows": entry.meta["n_rows"], "examples": entry.meta["n_examples"]}, built_s)


def checkpointing(run_config: RunConfig) -> bool:
    """Whether this run recomputes the student's block activations in backward: the trainer's
    default (on; ``KDBENCH_ACTIVATION_CHECKPOINTING=0`` turns it off) unless the run asked to keep
    them (``--keep-activations``). Either way the result is bitwise the same; only time and memory move."""
    return trainer.ACTIVATION_CHECKPOINTING and not run_config.keep_activations


def selection_rule(suite: SuiteSpec, n_valid: int) -> str:
    task = suite.valid_task
    decode = "greedy" if task.greedy else "sampled (seed 1)"
    return (f"best validation {task.headline} ({task.name}, {decode}, {n_valid} prompts) every "
            f"{suite.eval.valid_every} steps and at the last; ties: earliest")


def state_dir(db_url, run_id: int) -> Path:
    """Where a run keeps its resumable train state (in the cache, never in the repo)."""
    key = hashlib.sha256(str(db_url).encode()).hexdigest()[:10]
    return cache_dir() / "runs" / f"{key}-run{run_id}"


def best_weights(db_url, run_id: int) -> train_state.BestWeights:
    """The run's best-so-far weights, kept on disk beside its train state (not a second model in memory)."""
    return train_state.BestWeights(state_dir(db_url, run_id) / "best.safetensors")


@dataclass
class Setup:
    """Everything a run needs before its first step (built the same way for a new run and a resumed one)."""

    run_config: RunConfig
    objective: object
    label: str
    engine: object
    prep: Prepared
    teacher: object
    teacher_desc: dict
    student: torch.nn.Module
    batches: PackedBatches
    config: dict
    cost: dict = field(default_factory=dict)


def _setup(run_config: RunConfig, argv, *, check: bool = True) -> Setup:
    objective, suite, label = resolve(run_config)
    engine = open_store(run_config)  # after everything was checked, before any model is loaded
    device = torch.device(run_config.device)
    cost: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = prepare(suite, device, data_dir=run_config.data_dir, progress=run_config.progress)
    suite = prep.suite  # budgets in steps
    examples = prep.train_examples()
    cost["prepare_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    ref_ids = ensure_reference_rows(engine, prep, label, argv)
    cost["reference_rows_s"] = time.perf_counter() - t
    teacher, desc, cost["teacher_cache_build_s"] = make_teacher_source(prep, objective, run_config.teacher_source,
                                                                       run_config.seed, run_config.progress)
    if teacher is None or teacher.kind == "cache":
        prep.release_teacher()  # training needs no teacher model; evaluation loads it again
    torch.manual_seed(run_config.seed)
    student = prep.new_student()
    batches = PackedBatches(examples, suite.train.batch_size, run_config.seed, prep.tokenizer.pad_token_id)
    result = None
    if check:
        t = time.perf_counter()
        first = next(PackedBatches(examples, suite.train.batch_size, run_config.seed, prep.tokenizer.pad_token_id))
        result = startup_check(student, objective, first.to(device), teacher, chunk_size=HIDDEN_CHUNK_SIZE).to_dict()
        cost["startup_check_s"] = time.perf_counter() - t
        release_memory()  # the check's dense logits path is not training's
    request = stored_request(run_config)  # what `kdbench run --resume` rebuilds the run's RunConfig from
    config = {
        "objective": objective.name, "params": objective.params, "setting": objective.setting,
        "objective_version": getattr(objective.spec, "version", None),
        "suite": suite.to_dict(), "suite_version": label, "seed": run_config.seed, "device": run_config.device,
        "torch_threads": torch.get_num_threads(), "activation_checkpointing": checkpointing(run_config),
        "teacher": prep.teacher_identity(),
        "teacher_path": str(prep.teacher_path), "teacher_source": desc, "data_order": batches.describe(),
        "startup_check": result, "reference_runs": ref_ids, "reference_fingerprint": reference_fingerprint(prep),
        "student_keep": prep.student_keep, "data_sources": prep.data_manifest, "sweep_id": run_config.sweep_id,
        "request": request,
    }
    return Setup(run_config, objective, label, engine, prep, teacher, desc, student, batches, config, cost)


def prepare_only(run_config: RunConfig, argv: list[str] | None = None) -> dict:
    """`kdbench prepare`: what every run of the suite shares, built now -- the (fine-tuned)
    teacher, the reference rows and the teacher cache (whatever the objective) -- so that
    parallel runs find them instead of racing to build them."""
    objective, suite, label = resolve(run_config)
    engine = open_store(run_config)
    device = torch.device(run_config.device)
    prep = prepare(suite, device, data_dir=run_config.data_dir, progress=run_config.progress)
    refs = ensure_reference_rows(engine, prep, label, argv)
    desc = {"kind": "live"}
    if run_config.teacher_source == "cache":
        from kdbench.registry import get_objective

        _, desc, _ = make_teacher_source(prep, get_objective("kl"), "cache", run_config.seed, run_config.progress)
    return {"suite": prep.suite.name, "version": label, "reference_runs": refs, "teacher_source": desc,
            "teacher": str(prep.teacher_path), "reference_fingerprint": reference_fingerprint(prep)}


def run(run_config: RunConfig, argv: list[str] | None = None) -> int:
    """Distil, evaluate and record one run; returns its run id."""
    t0 = time.perf_counter()
    s = _setup(run_config, argv)
    check = s.config["startup_check"]
    print("[kdbench] resolved configuration:\n" + json.dumps(s.config, indent=2, default=str))
    writer = RunWriter.start(s.engine, role=ROLE_DISTILLED, suite=s.prep.suite.name, suite_version=s.label,
                             seed=run_config.seed, config=s.config, provenance=provenance.collect(argv),
                             objective=s.objective.name, params=s.objective.params, setting=s.objective.setting,
                             config_hash=run_key(run_config, s.objective, s.label),
                             sweep_id=run_config.sweep_id, host=this_host(), pid=os.getpid(), heartbeat_at=utcnow())
    writer.update(state_path=str(state_dir(s.engine.url, writer.run_id)))
    verdict = (f"start-up check passed: loss {check['loss_fast']:.6g} == {check['loss_dense']:.6g}" if check["passed"]
               else f"start-up check: loss not finite ({check['loss_dense']}) on the first batch")
    print(f"[kdbench] run {writer.run_id}: {s.objective.setting} for {s.prep.suite.train.steps} steps "
          f"(teacher {s.teacher_desc['kind']}; {verdict})")
    return _execute(s, writer, None, t0)


def resume(claim, argv: list[str] | None = None) -> int:
    """Continue a claimed run (kdbench/resumption.py) from its last checkpoint to the result the
    uninterrupted run gives. A failure before training gives the run back as it was."""
    run_id, engine = claim.run.id, claim.engine
    t0 = time.perf_counter()
    try:
        s = _setup(claim.run_config, argv, check=False)
        s.config = {**claim.run.config}
        optimizer = make_optimizer(s.student, s.prep.suite.train, torch.device(claim.run_config.device))
        state, _ = train_state.load(claim.folder, s.student, optimizer, s.batches, best_weights(engine.url, run_id))
        writer = RunWriter(engine, run_id, claim.owner)
        writer.truncate_curve(state.step)
    except BaseException:
        claim.release()
        raise
    print(f"[kdbench] run {run_id}: resuming {s.objective.setting} at step {state.step} of {s.prep.suite.train.steps}")
    return _execute(s, writer, (state, optimizer), t0, claim.heartbeat)


def _execute(s: Setup, writer: RunWriter, restored, t0: float, heartbeat: Heartbeat | None = None) -> int:
    suite, prep, device = s.prep.suite, s.prep, torch.device(s.run_config.device)
    cost = dict(s.cost)
    folder = state_dir(s.engine.url, writer.run_id) / "state"
    heartbeat = heartbeat or Heartbeat(s.engine, writer.run_id, owned=writer.owner is not None).start()
    try:
        validate = None
        if suite.eval.valid_every:
            def validate(m):
                score = validation_score(m, prep.tokenizer, prep.valid_inputs(), suite.eval, device,
                                         task=suite.valid_task)
                release_memory()  # generation's buffers are not training's: not kept resident under it
                return score

        def log(step, point):
            writer.curve(step, point["loss"], terms=point["terms"], lr=point["lr"], tokens=point["tokens"],
                         elapsed_s=point["elapsed_s"])

        def log_valid(step, score):
            writer.curve(step, None, split="valid", terms={suite.valid_task.headline: score})

        last_save = [time.perf_counter()]
        every = float(os.environ.get("KDBENCH_CHECKPOINT_EVERY_S", CHECKPOINT_EVERY_S))

        def on_step(st, opt):
            fault_point("training", st.step)
            if heartbeat.lost:
                writer.check_owner()  # raises OwnershipLost: another process resumed this run
            done = st.step == suite.train.steps
            if done or GRACEFUL.requested or time.perf_counter() - last_save[0] >= every:
                writer.check_owner()  # the train state, like the row, is written by the run's owner only
                train_state.save(folder, st, s.student, opt, s.batches)
                last_save[0] = time.perf_counter()
            if GRACEFUL.requested and not done:
                raise KeyboardInterrupt  # checkpointed: `kdbench run --resume` continues from here

        state, optimizer = restored if restored else (train_state.TrainState(best=best_weights(s.engine.url,
                                                                                               writer.run_id)), None)
        t = time.perf_counter()
        GRACEFUL.armed, GRACEFUL.requested = True, False
        try:
            result = train(model=s.student, objective=s.objective, batches=s.batches, teacher=s.teacher,
                           spec=suite.train, device=device, log=log, validate=validate,
                           valid_every=suite.eval.valid_every, log_valid=log_valid, state=state,
                           optimizer=optimizer, on_step=on_step, activation_checkpointing=checkpointing(s.run_config),
                           progress=s.run_config.progress)
        finally:
            GRACEFUL.armed = False
        cost["train_s"] = result.train_time_s
        cost["validation_s"] = max(0.0, time.perf_counter() - t - result.train_time_s)
        rule = selection_rule(suite, len(prep.valid_inputs().examples)) if validate is not None else result.selection_rule
        s.teacher = None
        s.student.zero_grad(set_to_none=True)
        state = optimizer = restored = None
        release_memory()
        n_eval = sum(len(v) for v in prep.tests.values())
        print(f"[kdbench] trained {result.steps} steps ({result.train_time_s:.0f}s of training, "
              f"{result.tokens_per_s:.0f} tok/s; checkpoint: step {result.selected_step}); evaluating "
              f"{len(suite.tasks)} task(s), {n_eval} prompts ...")
        t = time.perf_counter()
        s.student.requires_grad_(False)
        fault_point("evaluation")
        res = evaluate_all(s.student, prep)
        cost["evaluation_s"] = time.perf_counter() - t
        fault_point("writing")
        ckpt = save_student(s.student, prep.tokenizer, s.engine.url, writer.run_id) if s.run_config.save_student else None
        cost["wall_s"] = time.perf_counter() - t0
        cost["peak_memory_mb"] = peak_memory_mb(device) or 0.0
        writer.results(res.metrics, res.samples)
        writer.artifact("cost", cost)
        writer.finish(wall_time_s=cost["wall_s"], train_tokens_per_s=result.tokens_per_s,
                      peak_memory_mb=cost["peak_memory_mb"], selection_rule=rule, selected_step=result.selected_step,
                      checkpoint_path=ckpt)
        shutil.rmtree(folder.parent, ignore_errors=True)  # finished: the train state is no longer needed
        print("[kdbench] cost: " + ", ".join(f"{k} {v:.0f}" for k, v in cost.items()))
    except OwnershipLost as exc:
        raise RunFailed(f"run {writer.run_id}: {exc}") from None
    except KeyboardInterrupt:
        writer.interrupt("interrupted by the user" + (" (checkpointed; kdbench run --resume "
                                                      f"{writer.run_id})" if (folder / "state.json").is_file() else ""))
        raise
    except TrainingDiverged as exc:
        writer.fail(f"diverged: {exc}")
        raise RunFailed(f"run {writer.run_id} failed: diverged: {exc} (recorded as failed)") from None
    except Exception as exc:
        writer.fail(f"{type(exc).__name__}: {exc}")
        raise RunFailed(f"run {writer.run_id} failed: {type(exc).__name__}: {exc} (recorded as failed)") from exc
    finally:
        heartbeat.stop()
    return writer.run_id


def fault_point(name: str, step: int | None = None) -> None:
    """Tests of crash safety stop a real run at a named point: with ``KDBENCH_FAULT_AT=name``
    (``name@step`` for a training step) the process says so on stderr and waits to be killed.
    Does nothing otherwise."""
    want = os.environ.get("KDBENCH_FAULT_AT")
    if want and want == (name if step is None or "@" not in want else f"{name}@{step}"):
        import sys

        print(f"KDBENCH_FAULT_POINT {want}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 3600
        while not GRACEFUL.requested and time.monotonic() < deadline:  # SIGKILL, or SIGTERM ends the wait
            time.sleep(0.05)


def save_student(student, tokenizer, db_url, run_id: int) -> str:
    """The distilled student as a transformers folder in the cache (never in the repo), keyed by
    store and run id so several stores never share a folder."""
    key = hashlib.sha256(str(db_url).encode()).hexdigest()[:10]
    out = cache_dir() / "students" / f"{key}-run{run_id}"
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
