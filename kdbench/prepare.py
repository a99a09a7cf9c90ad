"""What a suite's runs share: data, (fine-tuned) teacher, student recipe, tokenised inputs.

``prepare(suite, device)`` dispatches on the suite spec:
* data: the builder named by ``suite.data["loader"]`` (kdbench/data/sources.py), from the
  embedded corpus or from a data root / the hub; budgets in epochs become steps;
* teacher: the selected pair's teacher (embedded GGUF converted once, a local folder or a hub
  id); when the suite has ``finetune`` and the pair's teacher is not already fine-tuned, the
  teacher fine-tuned on the training split (cached, kdbench/finetune.py);
* student: ``layer_subset`` -- blocks of the *base* teacher (the student never saw the
  task's fine-tuning data, like a generic pretrained student), or with ``"from": "teacher"``
  of the teacher actually used (DistilBERT's construction: the student is the compressed
  teacher) -- or ``pretrained``, loaded by name; teacher and student must share the
  vocabulary (checked here, never mapped).

Models are loaded lazily and can be released (:meth:`Prepared.release_teacher`): a run that
reads the teacher cache holds no teacher while it trains. Every split is tokenised once, by
:func:`prepare`, and only read afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdbench.data import sources
from kdbench.data.batching import Encoded, encode
from kdbench.device import inference_dtype, numerics, release_memory
from kdbench.engine import seqkd, teacher_cache
from kdbench.engine.teacher import CachedTeacher
from kdbench.errors import UserError
from kdbench.evaluation import prompt_cache
from kdbench.evaluation.protocol import TaskInputs
from kdbench.finetune import finetune_teacher
from kdbench.models import (build_student, fingerprint, layer_subset, load_causal_lm, load_tokenizer, model_digest,
                            prepare_teacher, tokenizer_digest)
from kdbench.suites import SuiteSpec


@dataclass
class Prepared:
    """Everything a suite's runs share (``splits["train"]``: Examples with .prompt / .references)."""

    suite: SuiteSpec               # with budgets in steps (epochs resolved)
    device: torch.device
    teacher_path: Path             # the teacher actually used (fine-tuned when the suite fine-tunes)
    tokenizer: object
    splits: dict                   # train / valid / test (test: the first task's full test set)
    student_keep: list[int] | None  # layer_subset students: the teacher blocks kept
    base_teacher_path: Path | None = None
    tests: dict = field(default_factory=dict)        # task name -> evaluated examples (capped, stable order)
    data_manifest: dict = field(default_factory=dict)
    _teacher: torch.nn.Module | None = field(default=None, repr=False)
    _inputs: dict = field(default_factory=dict, repr=False)   # tokenise(): train, valid, test:<task>
    _cache: dict = field(default_factory=dict, repr=False)    # teacher-cache sources of the test references

    # -- models ----------------------------------------------------------------------------
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher, held in bf16 where bf16 is native (it only runs inference: no
        autocast weight casts on every call), loaded on first use."""
        if self._teacher is None:
            dtype = inference_dtype(self.device, self.suite.train.bf16_autocast)
            self._teacher = load_causal_lm(self.teacher_path, dtype=dtype).to(self.device).eval().requires_grad_(False)
        return self._teacher

    def release_teacher(self) -> None:
        self._teacher = None
        release_memory()

    def new_student(self) -> torch.nn.Module:
        """A fresh float32 student (trainable)."""
        spec = self.suite.student
        if spec["kind"] == "layer_subset":
            source = self.teacher_path if spec.get("from") == "teacher" else (self.base_teacher_path or self.teacher_path)
            base = load_causal_lm(source)  # float32 (a bf16 fine-tuned teacher is upcast exactly)
            return build_student(base, self.student_keep, copy_weights=False).to(self.device)
        return load_causal_lm(spec["name"]).to(self.device)

    # -- tokenised inputs (built once by prepare(), read-only afterwards) ---------------------
    def tokenise(self) -> None:
        """Encode every split the runs read: the training examples (their first reference), the
        validation prompts and each task's evaluated test prompts with their references. Done
        once, before anything is trained, so that data a suite cannot use is refused before a
        model is loaded or a row is written."""
        t = self.suite.train
        try:
            train = [(e.id, encode(self.tokenizer, e.prompt, e.references[0], t.max_prompt_tokens, t.max_tokens,
                                   self.suite.system_prompt, e.id)) for e in self.splits["train"]]
        except ValueError as exc:
            raise UserError(f"suite {self.suite.name}: {exc}") from None
        if len(train) < t.batch_size:
            raise UserError(f"suite {self.suite.name}: {len(train)} training examples are fewer than one batch of "
                            f"{t.batch_size}")
        valid = sorted(self.splits["valid"], key=lambda e: e.id)[: self.suite.eval.n_valid]
        # the validation examples with their first reference, encoded as training encodes: the
        # validation loss (the distillm sampler's signal); one the limits cannot hold is left out
        valid_train = []
        for e in valid:
            try:
                valid_train.append((e.id, encode(self.tokenizer, e.prompt, e.references[0], t.max_prompt_tokens,
                                                 t.max_tokens, self.suite.system_prompt, e.id)))
            except ValueError:
                pass
        self._inputs = {"train": train, "valid": self._task_inputs(valid), "valid_train": valid_train,
                        **{f"test:{name}": self._task_inputs(examples) for name, examples in self.tests.items()}}

    def train_examples(self) -> list[tuple[str, Encoded]]:
        """``(example id, Encoded)`` for every training example (its first reference)."""
        return self._inputs["train"]

    def valid_examples(self) -> list[tuple[str, Encoded]]:
        """``(example id, Encoded)`` for the validation prompts with their first reference (the
        validation loss's examples; :meth:`valid_inputs` are the validation score's prompts)."""
        return self._inputs["valid_train"]

    def seqkd_examples(self, *, greedy: bool, progress: bool = True) -> tuple[list[tuple[str, Encoded]], dict, float]:
        """The training examples with the teacher's responses instead of the references, generated
        once per suite version and teacher group (kdbench/engine/seqkd.py). Returns ``(examples,
        what the run records about them, seconds spent generating)``."""
        ev, train = self.suite.eval, self.suite.train
        return seqkd.materialise(
            self.teacher, self.teacher_identity(), self.train_examples(), greedy=greedy,
            sampling={"temperature": ev.temperature, "top_k": ev.top_k, "top_p": ev.top_p},
            max_new_tokens=ev.max_new_tokens, max_tokens=train.max_tokens, eos_id=self.tokenizer.eos_token_id,
            pad_id=self.tokenizer.pad_token_id, batch_size=ev.batch_size, device=self.device,
            bf16=train.bf16_autocast, progress=progress)

    def task_inputs(self, task: str) -> TaskInputs:
        return self._inputs[f"test:{task}"]

    def valid_inputs(self) -> TaskInputs:
        return self._inputs["valid"]

    def _task_inputs(self, examples) -> TaskInputs:
        t = self.suite.train
        return TaskInputs.build(self.tokenizer, examples, t.max_prompt_tokens, t.max_tokens, self.suite.system_prompt)

    def reference_teacher(self, task: str):
        """The teacher's hidden states on the task's test references, cached once per suite
        version (kdbench/engine/teacher_cache.py): the reference KL of every later run reads
        them instead of running the teacher."""
        key = f"refs:{task}"
        if key not in self._cache:
            inputs = self.task_inputs(task)
            examples = [(e.id, r) for e, r in zip(inputs.examples, inputs.references)]
            inputs = teacher_cache.key_inputs(self.teacher_identity(), examples, self.suite.train,
                                              self.suite.system_prompt, self.device, role=f"test:{task}")
            entry, _ = teacher_cache.get_or_build(teacher_cache.cache_key(inputs), inputs, self.teacher, examples,
                                                  self.device, progress=False)
            self._cache[key] = CachedTeacher(entry, self.device)
        return self._cache[key]

    def teacher_prompts(self, task: str):
        """Where the teacher's prefill of the task's test prompts is kept between runs
        (kdbench/evaluation/prompt_cache.py): computed by the first evaluation, loaded by later ones."""
        inputs = prompt_cache.key_inputs(self.teacher_identity(), self.task_inputs(task).prompt_ids,
                                         self.suite.eval.batch_size, self.device,
                                         inference_dtype(self.device, self.suite.train.bf16_autocast))
        return prompt_cache.PromptCache(prompt_cache.entry_key(inputs), inputs)

    def training_teacher(self, seed: int, examples=None, *, progress: bool = True):
        """The cached teacher a training run with ``seed`` reads on ``examples`` (default: the
        training examples; a ``seqkd`` run's are the teacher's responses). Which examples it
        holds, and its key, are the teacher cache's to decide (kdbench/engine/teacher_cache.py
        ``for_training``). Returns ``(source, what the run records about it, seconds spent building)``."""
        examples = self.train_examples() if examples is None else examples
        return teacher_cache.for_training(self.teacher, self.teacher_identity(), examples,
                                          self.suite.train, self.suite.system_prompt, self.device, seed,
                                          progress=progress)

    # -- identities --------------------------------------------------------------------------
    def teacher_identity(self) -> dict:
        return {"weights": model_digest(self.teacher_path), "tokenizer": tokenizer_digest(self.teacher_path)}


def blocks_kept(student: dict, n_layers: int) -> list[int]:
    """The teacher blocks a ``layer_subset`` student keeps: ``keep`` (explicit indices) or
    ``keep_every`` (every N-th from the first, plus the last)."""
    if "keep" in student:
        keep = sorted(int(i) for i in student["keep"])
        if not keep or keep[0] < 0 or keep[-1] >= n_layers or len(set(keep)) != len(keep):
            raise UserError(f"student blocks {student['keep']} are not distinct blocks of a {n_layers}-block teacher")
        return keep
    return layer_subset(n_layers, student["keep_every"])


def resolve_epochs(suite: SuiteSpec, n_train: int) -> SuiteSpec:
    """Budgets in epochs -> steps (and validation every N epochs -> every M steps)."""
    train, ev = suite.train, suite.eval
    if train.epochs:
        train = dataclasses.replace(train, steps=train.steps_for(n_train))
    if train.valid_every_epochs:
        ev = dataclasses.replace(ev, valid_every=max(1, math.ceil(train.valid_every_epochs * n_train / train.batch_size)))
    return dataclasses.replace(suite, train=train, eval=ev)


def evaluated_examples(suite: SuiteSpec, task, examples) -> list:
    """The first N test examples by stable id order; N = the task's cap, capped by EvalSpec.n_test."""
    n = min(task.n_test or suite.eval.n_test, suite.eval.n_test)
    return sorted(examples, key=lambda e: e.id)[:n]


def check_vocabularies(teacher_tok, student_path) -> None:
    """Objectives compare logits position by position: the vocabularies must be identical."""
    try:
        student_tok = load_tokenizer(student_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the student's tokenizer from {student_path}: {str(exc).splitlines()[0]}") from None
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(f"teacher and student {student_path} have different vocabularies; kdbench needs a shared "
                        "vocabulary (no vocabulary mapping)")


def prepare(suite: SuiteSpec, device: torch.device, *, data_dir=None, progress: bool = True) -> Prepared:
    t0 = time.perf_counter()
    root = sources.data_root(data_dir) if sources.uses_data_root(suite) else None
    data = sources.build(suite, root)
    suite = resolve_epochs(suite, len(data.train))
    base = prepare_teacher(suite.teacher)
    keep = None
    if suite.student["kind"] == "layer_subset":
        from transformers import AutoConfig

        n_layers = AutoConfig.from_pretrained(str(base)).num_hidden_layers
        keep = blocks_kept(suite.student, n_layers)
        student_desc = f"student keeps blocks {keep}"
    elif suite.student["kind"] == "pretrained":
        # before any fine-tuning: a student that cannot be distilled costs nothing
        check_vocabularies(load_tokenizer(base), suite.student["name"])
        student_desc = f"student {suite.student['name']}"
    else:
        raise UserError(f"unknown student kind {suite.student['kind']!r} (layer_subset, pretrained)")
    teacher_path = base
    if suite.finetune is not None and not suite.selected.teacher_finetuned:
        teacher_path = finetune_teacher(base, suite.name, suite.finetune, data.train, device,
                                        system_prompt=suite.system_prompt, progress=progress)
    tokenizer = load_tokenizer(teacher_path)
    tests = {t.name: evaluated_examples(suite, t, data.tests[t.source]) for t in suite.tasks}
    splits = {"train": data.train, "valid": data.valid, "test": data.tests[suite.tasks[0].source]}
    print(f"[kdbench] prepared {suite.name}: teacher {teacher_path} ({time.perf_counter() - t0:.1f}s), "
          f"data train/valid/test = {len(data.train)}/{len(data.valid)}/"
          f"{'+'.join(str(len(data.tests[t.source])) for t in suite.tasks)}, {student_desc}")
    prep = Prepared(suite, device, teacher_path, tokenizer, splits, keep, base, tests, data.manifest)
    prep.tokenise()
    return prep


def reference_fingerprint(prep: Prepared) -> str:
    """The teacher group: reference rows (teacher, undistilled student) are reused, a sweep skips
    finished runs and the leaderboard pools rows only for the same teacher (by content: weights,
    config, tokenizer -- never its path), student construction, data and protocol (the suite
    version and label are matched too), computed on the same device kind with the same precision
    policy (kdbench/device.py ``numerics``: CPU model and numerics flags or GPU and compute
    capability; bf16 autocast, frozen dtype, float32 matmul precision). Every float of a run
    depends on those, and sampled responses are drawn from those floats: a GPU's rows, or a bf16
    CPU's beside a float32 CPU's, are not paired draws of one experiment, even from one teacher."""
    extra = {"student": prep.suite.student, "eval": dataclasses.asdict(prep.suite.eval), "data": prep.suite.data,
             "system_prompt": prep.suite.system_prompt,
             "numerics": numerics(prep.device, prep.suite.train.bf16_autocast)}
    if prep.suite.student["kind"] == "layer_subset" and prep.base_teacher_path is not None \
            and prep.base_teacher_path != prep.teacher_path and prep.suite.student.get("from") != "teacher":
        extra["student_base"] = model_digest(prep.base_teacher_path)
    return fingerprint(prep.teacher_path, extra)
