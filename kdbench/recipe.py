"""One distillation run as a recipe: ``setup()`` → ``start()`` → ``train()`` → ``evaluate()`` →
``record()``, or :meth:`DistillRun.resume` in place of ``start()`` for a run that stopped.

* ``setup`` resolves the configuration (kdbench/config.py: every user mistake is refused here,
  before any model is loaded; the device and ``--deterministic`` included), opens the store,
  pins the run's process-wide settings (kdbench/device.py: the device, IEEE float32 matmuls,
  deterministic algorithms or not), builds what the suite's runs share
  (kdbench/prepare.py: data, teacher, student recipe, tokenised splits), makes sure the
  reference rows exist, chooses the teacher source (the teacher cache decides which examples it
  holds) and runs the start-up check (kdbench/engine/check.py) -- all before the run's row is
  written, so a refused run touches nothing. ``kdbench prepare`` is ``setup`` without a run.
* ``start`` writes the run's row (this process its owner) and prints the resolved configuration
  once; the same dict is stored with the run.
* ``train`` runs the loop (kdbench/engine/trainer.py) with :class:`RunHooks`: curve points and
  validation scores into the store, a checkpoint every ``CHECKPOINT_EVERY_S`` and on SIGTERM,
  the ownership fence.
* ``evaluate`` runs the suite's protocol on the selected weights (kdbench/references.py);
  ``record`` writes metrics, samples and cost (seconds and peak memory per phase), and
  finishes the row.

Once the row exists, any failure marks it ``failed`` with the reason; Ctrl-C, SIGTERM or a lost
process leave it ``interrupted`` with its last checkpoint, and ``kdbench run --resume ID``
continues it to the same result (bit for bit: tests/test_resume.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kdbench import distributed, provenance
from kdbench.config import RunConfig, open_store, resolve, run_key, stored_request
from kdbench.device import (PhaseMemory, device_kind, peak_memory_mb, pin_run_settings, precision_policy,
                            refusing_nondeterministic_ops, release_memory, resolve_device, restoring_settings)
from kdbench.diskcache import cache_dir
from kdbench.engine import state as train_state
from kdbench.engine.batches import PackedBatches
from kdbench.engine.check import startup_check
from kdbench.engine.samplers import SAMPLERS, SampledBatches, get_sampler
from kdbench.engine.teacher import LiveTeacher, TimedTeacher
from kdbench.engine.trainer import (ACTIVATION_CHECKPOINTING, TrainHooks, TrainingDiverged, TrainResult,
                                    make_optimizer, train)
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


# ---------------------------------------------------------------------------- where a run keeps files


def run_folder(db_url, run_id: int, kind: str) -> Path:
    """``$KDBENCH_CACHE/<kind>/<store key>-run<id>``: a run's files in the cache (never in the
    repo), keyed by store as well as run id so that two stores never share a folder."""
    key = hashlib.sha256(str(db_url).encode()).hexdigest()[:10]
    return cache_dir() / kind / f"{key}-run{run_id}"


def state_dir(db_url, run_id: int) -> Path:
    """Where a run keeps its resumable train state and its best-so-far weights."""
    return run_folder(db_url, run_id, "runs")


def best_weights(db_url, run_id: int) -> train_state.BestWeights:
    """The run's best-so-far weights, on disk beside its train state (not a second model in memory)."""
    return train_state.BestWeights(state_dir(db_url, run_id) / "best.safetensors")


def save_student(student, tokenizer, db_url, run_id: int) -> str:
    """The distilled student as a transformers folder (``--save-student``)."""
    out = run_folder(db_url, run_id, "students")
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------------------- what a run records about itself


def checkpointing(run_config: RunConfig) -> bool:
    """Whether this run recomputes the student's block activations in backward: the trainer's
    default (on; ``KDBENCH_ACTIVATION_CHECKPOINTING=0`` turns it off) unless the run asked to keep
    them (``--keep-activations``). Either way the result is bitwise the same; only time and memory move."""
    return ACTIVATION_CHECKPOINTING and not run_config.keep_activations


def distillm_every(suite: SuiteSpec) -> int:
    """Steps between the ``distillm`` sampler's looks at the validation loss: the suite's
    validation interval (DistiLLM validates once an epoch), else a tenth of the budget."""
    return suite.eval.valid_every or max(1, suite.train.steps // 10)


def selection_rule(suite: SuiteSpec, n_valid: int) -> str:
    task = suite.valid_task
    decode = "greedy" if task.greedy else "sampled (seed 1)"
    return (f"best validation {task.headline} ({task.name}, {decode}, {n_valid} prompts) every "
            f"{suite.eval.valid_every} steps and at the last; ties: earliest")


# ---------------------------------------------------------------------------- the trainer's hooks


class RunHooks(TrainHooks):
    """The loop's callbacks for a stored run: curve points and validation scores go to the
    store as they are made; after each step the ownership fence, and a checkpoint when
    ``CHECKPOINT_EVERY_S`` has passed, at the last step and on a graceful stop (SIGTERM), which
    then ends the loop with :class:`KeyboardInterrupt` (the run is recorded as interrupted). On
    several processes rank 0 writes, and its clock and signals decide for every rank (one
    broadcast a step): every rank checkpoints (a sharded student: its shards) and stops at the
    same step."""

    def __init__(self, run: "DistillRun"):
        self.run = run
        suite = run.prep.suite
        self.valid_every = suite.eval.valid_every
        self.steps = suite.train.steps
        self.every = float(os.environ.get("KDBENCH_CHECKPOINT_EVERY_S", CHECKPOINT_EVERY_S))
        self.last_save = time.perf_counter()

    def on_log(self, step: int, point: dict) -> None:
        if self.run.world.main:
            self.run.writer.curve(step, point["loss"], terms=point["terms"], lr=point["lr"], tokens=point["tokens"],
                                  elapsed_s=point["elapsed_s"])

    def validate(self, model: torch.nn.Module) -> float:
        """The validation score: on several processes each decodes its share of the prompts and
        every rank gets the one score (the ranks hold the same weights, and must choose the same
        checkpoint)."""
        prep = self.run.prep
        with self.run.memory.phase("validation"):
            score = validation_score(model, prep.tokenizer, prep.valid_inputs(), prep.suite.eval, prep.device,
                                     task=prep.suite.valid_task, world=self.run.world)
        release_memory()  # generation's buffers are not training's: not kept resident under it
        return score

    def on_valid(self, step: int, score: float) -> None:
        if self.run.world.main:
            self.run.writer.curve(step, None, split="valid", terms={self.run.prep.suite.valid_task.headline: score})

    def on_step(self, state: train_state.TrainState, optimizer: torch.optim.Optimizer) -> None:
        run, main = self.run, self.run.world.main
        done = state.step == self.steps
        if main and run.heartbeat.lost:
            run.writer.check_owner()  # raises OwnershipLost: another process resumed this run
        stop = GRACEFUL.requested and not done
        save = done or stop or time.perf_counter() - self.last_save >= self.every
        if run.world.several:  # rank 0's clock and signal decide for every rank: one decision
            save, stop = distributed.broadcast(run.world, (save, stop) if main else None)
        if save and run.run_config.fsdp:  # every rank writes its shards (kdbench/engine/fsdp.py)
            from kdbench.engine import fsdp

            if main:
                run.writer.check_owner()
            fsdp.save(run.shared_state_folder, state, run.model, optimizer, run.batches, device=run.device)
            self.last_save = time.perf_counter()
        elif save and main:  # the train state, like the row, is written by the run's owner only
            run.writer.check_owner()
            train_state.save(run.state_folder, state, run.student, optimizer, run.batches, device=run.device)
            self.last_save = time.perf_counter()
        if stop:
            raise KeyboardInterrupt  # checkpointed: `kdbench run --resume` continues from here


# ---------------------------------------------------------------------------- the recipe


class DistillRun:
    """One run of one objective on one suite and seed. Each phase fills the attributes the next
    reads; the suite's assets (``prep``) are built once in :meth:`setup` and only read afterwards."""

    def __init__(self, run_config: RunConfig, argv: list[str] | None = None):
        self.run_config = run_config
        self.argv = argv
        self.device: torch.device | None = None  # setup(): the concrete device --device names here (a rank's own)
        self.world = distributed.from_env()      # this process among the run's (one, unless launched on several)
        self.t0 = time.perf_counter()
        self.cost: dict = {}                 # seconds and peak memory per phase (the run's ``cost`` artifact)
        self.memory: PhaseMemory | None = None
        self.determinism: dict = {}          # what a --deterministic run records of its settings
        # setup()
        self.objective = self.label = self.store = None
        self.prep: Prepared | None = None
        self.reference_runs: dict = {}       # role -> id of the suite's reference rows
        self.teacher = None                  # the teacher source training reads; None when the objective needs none
        self.teacher_desc: dict = {}
        self.student: torch.nn.Module | None = None
        self.sampler = None                  # where training responses come from (kdbench/engine/samplers.py)
        self.sampler_desc: dict = {}         # seqkd: the teacher-generated set it trains on
        self.batches: PackedBatches | SampledBatches | None = None
        self.config: dict = {}               # the resolved configuration, printed and stored once
        # start() / resume()
        self.writer: RunWriter | None = None
        self.heartbeat: Heartbeat | None = None
        self.state: train_state.TrainState | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # train() / evaluate()
        self.result: TrainResult | None = None
        self.model: torch.nn.Module | None = None  # train(): what the trainer trained (the student, or it wrapped)
        self.shared_state_folder: Path | None = None  # start() / resume(): the train state's folder, on every rank
        self.evaluation = None
        self.saved_student: str | None = None   # evaluate(): where --save-student put the weights

    @property
    def state_folder(self) -> Path:
        return state_dir(self.store.url, self.writer.run_id) / "state"

    # -- setup: everything before the run's row ----------------------------------------------
    def setup(self, *, check: bool = True) -> "DistillRun":
        """:meth:`prepare_suite`, then the teacher source, a fresh student, the batch source and
        (``check``) the start-up check on the first batch."""
        rc = self.run_config
        self.prepare_suite()
        prep = self.prep
        self.sampler = get_sampler(rc.sampler)
        suite = prep.suite
        examples = prep.train_examples()
        if self.sampler.name == "seqkd":  # the teacher's responses in place of the references, then as off
            with self._setup_phase("seqkd", "generating the teacher's responses (seqkd)"), \
                    distributed.main_first(self.world):
                examples, self.sampler_desc, self.cost["seqkd_build_s"] = prep.seqkd_examples(
                    greedy=bool(self.sampler.params["greedy"]), progress=rc.progress)
        # the student's samples are new sequences: only a live teacher can score them
        source = "live" if self.sampler.on_policy else rc.teacher_source
        with self._setup_phase("teacher_cache", "building the teacher cache"), distributed.main_first(self.world):
            self.teacher, self.teacher_desc, self.cost["teacher_cache_build_s"] = self._teacher_source(source, examples)
        if self.teacher is None or self.teacher.kind == "cache":
            prep.release_teacher()  # training needs no teacher model; evaluation loads it again
        if self.sampler.on_policy and self.teacher is not None:  # the run's cost says what scoring took
            self.teacher = TimedTeacher(self.teacher)
        torch.manual_seed(rc.seed)
        self.student = prep.new_student()
        self.batches = PackedBatches(examples, suite.train.batch_size, rc.seed, prep.tokenizer.pad_token_id)
        if self.sampler.on_policy:
            self.batches = SampledBatches(
                self.batches, self.sampler, self.student, seed=rc.seed, eos_id=prep.tokenizer.eos_token_id,
                pad_id=prep.tokenizer.pad_token_id, max_new_tokens=suite.eval.max_new_tokens,
                max_tokens=suite.train.max_tokens, temperature=suite.eval.temperature, top_k=suite.eval.top_k,
                top_p=suite.eval.top_p, device=self.device, bf16=suite.train.bf16_autocast, steps=suite.train.steps,
                valid_every=distillm_every(suite), valid_examples=prep.valid_examples())
        checked = None
        if check:
            t = time.perf_counter()
            with self._setup_phase("startup_check", "the start-up check"):
                checked = startup_check(self.student, self.objective, self.batches.peek().to(self.device),
                                        self.teacher, chunk_size=HIDDEN_CHUNK_SIZE).to_dict()
            self.cost["startup_check_s"] = time.perf_counter() - t
            release_memory()  # the check's dense logits path is not training's
        self.config = {
            "objective": self.objective.name, "params": self.objective.params, "setting": self.setting,
            "sampler": self._sampler_record(),
            "objective_version": getattr(self.objective.spec, "version", None),
            "suite": prep.suite.to_dict(), "suite_version": self.label, "seed": rc.seed,
            "device": str(self.device), "device_kind": device_kind(self.device),
            "precision": precision_policy(self.device, prep.suite.train.bf16_autocast),
            "deterministic": rc.deterministic, **({"determinism": self.determinism} if self.determinism else {}),
            "processes": self.world.size, "accumulation": rc.accumulation,
            "torch_threads": torch.get_num_threads(), "activation_checkpointing": checkpointing(rc),
            "teacher": prep.teacher_identity(),
            "teacher_path": str(prep.teacher_path), "teacher_source": self.teacher_desc,
            "data_order": self.batches.describe(), "startup_check": checked, "reference_runs": self.reference_runs,
            "reference_fingerprint": reference_fingerprint(prep), "student_keep": prep.student_keep,
            "data_sources": prep.data_manifest, "sweep_id": rc.sweep_id,
            "request": stored_request(rc),  # what `kdbench run --resume` rebuilds the run's RunConfig from
        }
        return self

    @property
    def setting(self) -> str:
        """The leaderboard row this run belongs to (:meth:`Sampler.row`: ``kl`` or ``kl+imitkd``)."""
        return self.sampler.row(self.objective.setting) if self.sampler is not None else self.objective.setting

    def _sampler_record(self) -> dict:
        """What the run records of its sampler (``config["sampler"]``)."""
        record = {"setting": self.sampler.setting, "name": self.sampler.name, "params": self.sampler.params}
        if self.sampler.name == "off":
            return record
        ev, suite = self.prep.suite.eval, self.prep.suite
        record["paper"] = SAMPLERS[self.sampler.name].paper
        if self.sampler.name == "seqkd":
            record["teacher_responses"] = self.sampler_desc
            return record
        record.update(student_probability=self.sampler.student_probability,
                      sampling={"temperature": ev.temperature, "top_k": ev.top_k, "top_p": ev.top_p,
                                "max_new_tokens": ev.max_new_tokens, "max_tokens": suite.train.max_tokens,
                                "draws": "keyed by (seed, <example id>@step<n>, position); coin by (seed, step)"})
        if self.sampler.name == "distillm":
            record["schedule"] = {"validation_loss": f"student cross-entropy per counted token on the "
                                  f"{len(self.prep.valid_examples())} validation examples' references",
                                  "every": distillm_every(suite), "steps": suite.train.steps,
                                  "replay_ratio": "decreasing: fresh samples with probability p * (1 - step / steps)",
                                  "replay": "draws keyed by (seed, step), without replacement; eviction first in, first out"}
        return record

    def prepare_suite(self) -> "DistillRun":
        """What every run of the suite shares: the configuration resolved, the store opened, the
        suite prepared (data, (fine-tuned) teacher, tokenised splits) and its reference rows."""
        rc = self.run_config
        self.objective, suite, self.label = resolve(rc)
        # checked by resolve(): concrete now (auto -> cuda:0 or cpu; a rank of several: its own GPU)
        self.device = distributed.rank_device(self.world, resolve_device(rc.device))
        distributed.join(self.world, self.device)
        self.memory = PhaseMemory(self.device)
        if self.world.main:  # the run's row, curves and results are rank 0's to write
            self.store = open_store(rc)  # after everything was checked, before any model is loaded
        self.determinism = pin_run_settings(self.device, rc.deterministic)
        t = time.perf_counter()
        with self._setup_phase("prepare", "preparing the suite (the teacher's fine-tune)"), \
                distributed.main_first(self.world):  # rank 0 fine-tunes; the others read its result
            self.prep = prepare(suite, self.device, data_dir=rc.data_dir, progress=rc.progress and self.world.main)
        self.cost["prepare_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.world.main:
            with self._setup_phase("reference_rows", "evaluating the reference rows"):
                self.reference_runs = ensure_reference_rows(self.store, self.prep, self.label, self.argv)
        self.cost["reference_rows_s"] = time.perf_counter() - t
        return self

    @contextmanager
    def _setup_phase(self, name: str, what: str):
        """A phase before the run's row: its peak memory measured (``cost["memory"][name]``), and
        an op that ``--deterministic`` cannot run on this device refused in one line, exit 2."""
        with self.memory.phase(name), refusing_nondeterministic_ops(self.device, what):
            yield

    def _teacher_source(self, kind: str, examples) -> tuple[object, dict, float]:
        if not self.objective.needs_teacher:
            return None, {"kind": "none"}, 0.0
        if kind == "live":
            return LiveTeacher(self.prep.teacher()), {"kind": "live"}, 0.0
        return self.prep.training_teacher(self.run_config.seed, examples, progress=self.run_config.progress)

    # -- start / resume: the run's row and its owner -----------------------------------------
    def start(self) -> "DistillRun":
        """Write the run's row (this process its owner), print the resolved configuration. On
        several processes rank 0 does; the others train and evaluate beside it (:meth:`finish`)."""
        rc, check = self.run_config, self.config["startup_check"]
        if not self.world.main:
            self.state = train_state.TrainState()
            self.shared_state_folder = Path(distributed.broadcast(self.world, None))
            return self
        if rc.fsdp:  # the best weights are each rank's shards, kept in memory (kdbench/engine/fsdp.py)
            self.state = train_state.TrainState()
        print("[kdbench] resolved configuration:\n" + json.dumps(self.config, indent=2, default=str))
        self.writer = RunWriter.start(
            self.store, role=ROLE_DISTILLED, suite=self.prep.suite.name, suite_version=self.label, seed=rc.seed,
            config=self.config, provenance=provenance.collect(self.argv), objective=self.objective.name,
            params=self.objective.params, setting=self.setting,
            config_hash=run_key(rc, self.objective, self.label), sweep_id=rc.sweep_id, host=this_host(),
            pid=os.getpid(), heartbeat_at=utcnow())
        self.writer.update(state_path=str(state_dir(self.store.url, self.writer.run_id)))
        self.heartbeat = Heartbeat(self.store, self.writer.run_id, owned=self.writer.owner is not None).start()
        if self.state is None:
            self.state = train_state.TrainState(best=best_weights(self.store.url, self.writer.run_id))
        self.shared_state_folder = self.state_folder
        if self.world.several:  # a sharded student's train state is every rank's to write
            distributed.broadcast(self.world, str(self.state_folder))
        verdict = (f"start-up check passed: loss {check['loss_fast']:.6g} == {check['loss_dense']:.6g}"
                   if check["passed"] else f"start-up check: loss not finite ({check['loss_dense']}) on the first batch")
        print(f"[kdbench] run {self.writer.run_id}: {self.setting} for {self.prep.suite.train.steps} steps "
              f"(teacher {self.teacher_desc['kind']}; {verdict})")
        return self

    @classmethod
    def resume(cls, claim, argv: list[str] | None = None) -> "DistillRun":
        """A claimed run (kdbench/resumption.py) set up again from its stored request and
        restored to its last checkpoint. A failure here gives the run back as it was."""
        # on the device it started on (its request may say auto, which could name another one here)
        recorded = (claim.run.config or {}).get("device")
        run = cls(dataclasses.replace(claim.run_config, device=recorded) if recorded else claim.run_config, argv)
        try:
            run.setup(check=False)
            run.config = {**claim.run.config}
            run.store, run.heartbeat = claim.engine, claim.heartbeat
            run.shared_state_folder = claim.folder
            if run.run_config.fsdp:  # sharded before the optimiser is made: it holds the shards
                from kdbench.engine import fsdp

                run.model = fsdp.shard_student(run.student, run.device)
            run.optimizer = make_optimizer(run.student, run.prep.suite.train, run.device)
            if run.run_config.fsdp:  # every rank reads its own shards into the sharded student
                run.state, _ = fsdp.load(claim.folder, run.model, run.optimizer, run.batches, device=run.device)
            else:  # every rank reads the one state rank 0 wrote (the cursor is the step's, whatever the world)
                best = best_weights(claim.engine.url, claim.run.id) if run.world.main else train_state.BestWeights()
                run.state, _ = train_state.load(claim.folder, run.student, run.optimizer, run.batches, best,
                                                device=run.device)
            if run.world.main:
                run.writer = RunWriter(claim.engine, claim.run.id, claim.owner)
                run.writer.truncate_curve(run.state.step)
        except BaseException:
            claim.release()
            raise
        if run.world.main:
            print(f"[kdbench] run {claim.run.id}: resuming {run.setting} at step {run.state.step} of "
                  f"{run.prep.suite.train.steps}" + (f" on {run.world.size} processes" if run.world.several else ""))
        return run

    # -- the phases after the row: train, evaluate, record -----------------------------------
    def train(self) -> TrainResult:
        from kdbench.engine.tuning import StepTuning, step_tuning

        suite = self.prep.suite
        tuning = self.config.get("step_tuning")  # a resumed run trains with the settings it started with
        if tuning is None:  # chosen once, the student on its device; stored with the run (kdbench/engine/tuning.py)
            tuning = step_tuning(self.device, model=self.student, spec=suite.train, teacher=self.teacher,
                                 activation_checkpointing=False if self.run_config.keep_activations else None).to_dict()
            self.config = {**self.config, "activation_checkpointing": tuning["activation_checkpointing"],
                           "step_tuning": tuning}
            if self.world.main:
                self.writer.update(config=self.config)
        model = self.model = self._wrapped_student()
        t = time.perf_counter()
        GRACEFUL.armed, GRACEFUL.requested = True, False
        try:
            with self.memory.phase("train"):  # validation is its own phase (RunHooks.validate)
                self.result = train(model=model, objective=self.objective, batches=self.batches,
                                    teacher=self.teacher, spec=suite.train, device=self.device, hooks=RunHooks(self),
                                    state=self.state, optimizer=self.optimizer, tuning=StepTuning.from_dict(tuning),
                                    accumulation=self.run_config.accumulation,
                                    progress=self.run_config.progress and self.world.main)
        finally:
            GRACEFUL.armed = False
        self.cost["train_s"] = self.result.train_time_s
        if isinstance(self.batches, SampledBatches):  # generation and scoring are inside train_s; said apart here
            self.cost.update(self.batches.cost())
            self.cost["teacher_scoring_s"] = self.teacher.seconds
            self.cost["student_step_s"] = max(0.0, self.cost["train_s"] - self.teacher.seconds - sum(
                self.cost.get(k, 0.0) for k in ("sampler_generation_s", "sampler_validation_s")))
        self.cost["validation_s"] = max(0.0, time.perf_counter() - t - self.result.train_time_s)
        # what only training needed goes before evaluation loads its models
        self.teacher = self.state = self.optimizer = None
        self.student.zero_grad(set_to_none=True)
        release_memory()
        return self.result

    def _wrapped_student(self) -> torch.nn.Module:
        """What the trainer trains: the student itself on one process; on several
        ``DDP(StudentBody(student))`` (DDP all-reduces the gradients in StudentBody's forward,
        kdbench/modeling.py), or with ``--fsdp`` the student sharded (kdbench/engine/fsdp.py)."""
        if self.model is not None:  # resumed sharded: sharded before its state was read
            return self.model
        if self.run_config.fsdp:
            from kdbench.engine.fsdp import shard_student

            return shard_student(self.student, self.device)
        if not self.world.several:
            return self.student
        from torch.nn.parallel import DistributedDataParallel

        from kdbench.modeling import StudentBody

        return DistributedDataParallel(StudentBody(self.student),
                                       device_ids=[self.device] if self.device.type == "cuda" else None)

    @contextmanager
    def _whole_student(self):
        """The trained student with its whole weights: itself, or a sharded one's weights gathered
        on every rank (a collective) for as long as the block runs."""
        from kdbench.engine.fsdp import is_sharded

        if self.model is not None and is_sharded(self.model):
            with self.model.full_weights() as lm:
                yield lm
        else:
            yield self.student

    def evaluate(self):
        suite, r = self.prep.suite, self.result
        n_eval = sum(len(v) for v in self.prep.tests.values())
        if self.world.main:
            print(f"[kdbench] trained {r.steps} steps ({r.train_time_s:.0f}s of training, {r.tokens_per_s:.0f} tok/s; "
                  f"checkpoint: step {r.selected_step}); evaluating {len(suite.tasks)} task(s), {n_eval} prompts"
                  + (f" on {self.world.size} processes" if self.world.several else "") + " ...")
        t = time.perf_counter()
        self.student.requires_grad_(False)
        with self.memory.phase("evaluation"), self._whole_student() as lm:
            self.evaluation = evaluate_all(lm, self.prep, world=self.world)
            if self.world.main and self.run_config.save_student:  # while the weights are whole
                self.saved_student = save_student(lm, self.prep.tokenizer, self.store.url, self.writer.run_id)
        self.cost["evaluation_s"] = time.perf_counter() - t
        return self.evaluation

    def record(self) -> int:
        suite, r = self.prep.suite, self.result
        ckpt = self.saved_student
        self.cost["wall_s"] = time.perf_counter() - self.t0
        self.cost["peak_memory_mb"] = peak_memory_mb() or 0.0  # the process's, host RSS (runs.peak_memory_mb)
        self.cost["memory"] = self.memory.to_dict()
        rule = (selection_rule(suite, len(self.prep.valid_inputs().examples)) if suite.eval.valid_every
                else r.selection_rule)
        if r.parallel:  # how the steps were split: processes x accumulation x micro-batch
            self.config = {**self.config, "parallel": r.parallel}
            self.writer.update(config=self.config)
        self.writer.results(self.evaluation.metrics, self.evaluation.samples)
        self.writer.artifact("cost", self.cost)
        self.writer.finish(wall_time_s=self.cost["wall_s"], train_tokens_per_s=r.tokens_per_s,
                           peak_memory_mb=self.cost["peak_memory_mb"], selection_rule=rule,
                           selected_step=r.selected_step, checkpoint_path=ckpt)
        shutil.rmtree(self.state_folder.parent, ignore_errors=True)  # finished: the train state is not needed
        print("[kdbench] cost: " + ", ".join(f"{k} {v:.0f}" for k, v in self.cost.items()
                                             if isinstance(v, (int, float))))
        print("[kdbench] peak memory per phase (MB): " + memory_line(self.cost["memory"]))
        return self.writer.run_id

    def finish(self) -> int | None:
        """Train, evaluate and record a started or resumed run; returns its id. Every way out
        leaves the row in a true state: finished, failed (with the reason) or interrupted. A rank
        other than 0 trains, evaluates its share of the prompts and leaves (None): rank 0 gathers
        the evaluation and records."""
        if not self.world.main:
            try:
                self.train()
                self.evaluate()  # this rank's share of the prompts, gathered by rank 0
            finally:
                distributed.leave()
            return None
        run_id = self.writer.run_id
        try:
            self.train()
            self.evaluate()
            return self.record()
        except OwnershipLost as exc:
            raise RunFailed(f"run {run_id}: {exc}") from None
        except KeyboardInterrupt:
            saved = (self.state_folder / "state.json").is_file()
            self.writer.interrupt("interrupted by the user" + (f" (checkpointed; kdbench run --resume {run_id})"
                                                               if saved else ""))
            raise
        except TrainingDiverged as exc:
            self.writer.fail(f"diverged: {exc}")
            raise RunFailed(f"run {run_id} failed: diverged: {exc} (recorded as failed)") from None
        except Exception as exc:
            why = distributed.lost_peer(self.world, exc) or f"{type(exc).__name__}: {exc}"
            self.writer.fail(why)
            raise RunFailed(f"run {run_id} failed: {why} (recorded as failed)") from exc
        finally:
            self.heartbeat.stop()
            distributed.leave()


# ---------------------------------------------------------------------------- the commands' entry points


def memory_line(memory: dict) -> str:
    """``prepare 1834, ..., train 2510 (cuda 1200 allocated / 1400 reserved), ...`` from ``cost["memory"]``."""
    parts = []
    for name, peaks in memory.items():
        if not isinstance(peaks, dict):
            continue
        text = f"{name} {peaks.get('host_rss_peak_mb', float('nan')):.0f}"
        if "cuda_allocated_peak_mb" in peaks:
            text += f" (cuda {peaks['cuda_allocated_peak_mb']:.0f} allocated / {peaks['cuda_reserved_peak_mb']:.0f} " \
                    f"reserved)"
        parts.append(text)
    host = memory.get("host_rss", "per phase")
    return ", ".join(parts) + ("" if host == "per phase" else f" (host: {host})")


def run(run_config: RunConfig, argv: list[str] | None = None) -> int:
    """`kdbench run`: distil, evaluate and record one run; returns its run id. The process's
    device, precision and determinism settings are the run's while it runs, and as they were after."""
    with restoring_settings():
        return DistillRun(run_config, argv).setup().start().finish()


def resume(claim, argv: list[str] | None = None) -> int:
    """`kdbench run --resume ID`: continue a claimed run to the result the uninterrupted run gives."""
    with restoring_settings():
        return DistillRun.resume(claim, argv).finish()


def prepare_only(run_config: RunConfig, argv: list[str] | None = None) -> dict:
    """`kdbench prepare`: what every run of the suite shares, built now -- the (fine-tuned)
    teacher, the reference rows and (``--teacher-source cache``) the teacher cache whatever the
    objective -- so that parallel runs find them instead of racing to build them."""
    with restoring_settings():
        r = DistillRun(run_config, argv).prepare_suite()
        desc = {"kind": "live"}
        if run_config.teacher_source == "cache":
            with r._setup_phase("teacher_cache", "building the teacher cache"):
                _, desc, _ = r.prep.training_teacher(run_config.seed, progress=run_config.progress)
        fingerprint = reference_fingerprint(r.prep)
    return {"suite": r.prep.suite.name, "version": r.label, "reference_runs": r.reference_runs,
            "teacher_source": desc, "teacher": str(r.prep.teacher_path),
            "reference_fingerprint": fingerprint}
