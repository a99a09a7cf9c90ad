"""What a suite's runs share, built once per process: data, (fine-tuned) teacher, student recipe.

``prepare(suite, device)`` dispatches on the suite spec:
* data: the builder named by ``suite.data["loader"]`` (kdbench/data/sources.py), from the
  embedded corpus or from a data root / the hub;
* teacher: the selected pair's teacher (embedded GGUF converted once, a local folder or a hub
  id); when the suite has ``finetune`` and the pair's teacher is not already fine-tuned, the
  teacher fine-tuned on the training split (cached, kdbench/finetune.py);
* student: ``layer_subset`` -- blocks of the *base* teacher (the student never saw the
  task's fine-tuning data, like a generic pretrained student) -- or ``pretrained``, loaded
  by name; teacher and student must share the vocabulary (checked here, never mapped);
* budgets given in epochs are turned into steps once the training set size is known.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdbench.data import sources
from kdbench.errors import UserError
from kdbench.finetune import finetune_teacher, resolved_steps
from kdbench.models import build_student, fingerprint, layer_subset, load_causal_lm, load_tokenizer, prepare_teacher
from kdbench.suites import SuiteSpec
from kdbench.train import native_bf16


@dataclass
class Prepared:
    """Everything a suite's runs share (``splits["train"]``: Examples with .prompt / .references)."""

    suite: SuiteSpec               # with budgets in steps (epochs resolved)
    teacher_path: Path             # the teacher actually used (fine-tuned when the suite fine-tunes)
    tokenizer: object
    teacher: torch.nn.Module
    splits: dict                   # train / valid / test (test: the first task's full test set)
    student_keep: list[int] | None  # layer_subset students: the teacher blocks kept
    base_teacher_path: Path | None = None
    tests: dict = field(default_factory=dict)        # task name -> evaluated examples (capped, stable order)
    data_manifest: dict = field(default_factory=dict)

    def new_student(self) -> torch.nn.Module:
        """A fresh float32 student (the teacher in memory may be bf16: it only runs inference)."""
        spec = self.suite.student
        if spec["kind"] == "layer_subset":
            return build_student(load_causal_lm(self.base_teacher_path or self.teacher_path), self.student_keep)
        return load_causal_lm(spec["name"])


def resolve_epochs(suite: SuiteSpec, n_train: int) -> SuiteSpec:
    """Budgets in epochs -> steps (and validation every N epochs -> every M steps)."""
    train, ev = suite.train, suite.eval
    if train.epochs:
        train = dataclasses.replace(train, steps=resolved_steps(train, n_train))
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
    teacher_path = base
    if suite.finetune is not None and not suite.selected.teacher_finetuned:
        teacher_path = finetune_teacher(base, suite.name, suite.finetune, data.train, device, progress=progress)
    tokenizer = load_tokenizer(teacher_path)
    # The frozen teacher only runs inference: hold it in bf16 where bf16 is native, so neither
    # training nor sampling pays autocast's per-call weight casts (they are not cached for
    # parameters that do not require grad).
    dtype = torch.bfloat16 if suite.train.bf16_autocast and native_bf16(device) else torch.float32
    teacher = load_causal_lm(teacher_path, dtype=dtype).to(device).eval().requires_grad_(False)
    keep = None
    if suite.student["kind"] == "layer_subset":
        keep = layer_subset(teacher.config.num_hidden_layers, suite.student["keep_every"])
        student_desc = f"student keeps blocks {keep}"
    elif suite.student["kind"] == "pretrained":
        check_vocabularies(tokenizer, suite.student["name"])
        student_desc = f"student {suite.student['name']}"
    else:
        raise UserError(f"unknown student kind {suite.student['kind']!r} (layer_subset, pretrained)")
    tests = {t.name: evaluated_examples(suite, t, data.tests[t.source]) for t in suite.tasks}
    splits = {"train": data.train, "valid": data.valid, "test": data.tests[suite.tasks[0].source]}
    print(f"[kdbench] prepared {suite.name}: teacher {teacher_path} ({time.perf_counter() - t0:.1f}s), "
          f"data train/valid/test = {len(data.train)}/{len(data.valid)}/"
          f"{'+'.join(str(len(data.tests[t.source])) for t in suite.tasks)}, {student_desc}")
    return Prepared(suite, teacher_path, tokenizer, teacher, splits, keep, base, tests, data.manifest)


def reference_fingerprint(prep: Prepared) -> str:
    """Reference rows (teacher, undistilled student) are reused only for the same teacher,
    student construction, data and protocol (the suite version and label are matched too)."""
    extra = {"student": prep.suite.student, "eval": dataclasses.asdict(prep.suite.eval), "data": prep.suite.data}
    if not Path(prep.teacher_path).is_dir():  # a hub id: the folder cannot be fingerprinted, its name can
        extra["teacher"] = str(prep.teacher_path)
    return fingerprint(prep.teacher_path, extra)
