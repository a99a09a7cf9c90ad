"""The reference rows: the teacher and the undistilled student, evaluated once per suite version.

Every distilled result is read against this band (teacher above, undistilled student below).
They are found by suite, version label and :func:`kdbench.prepare.reference_fingerprint` — a
content fingerprint (weights, config, tokenizer; never a path) — so a committed store's rows
are reused on any machine that has the same teacher.
"""

from __future__ import annotations

import time

import torch

from kdbench import provenance
from kdbench.distributed import SINGLE, World
from kdbench.evaluation.protocol import EvalResult, evaluate_model
from kdbench.prepare import Prepared, reference_fingerprint
from kdbench.store import ROLE_STUDENT_INIT, ROLE_TEACHER, RunWriter, find_reference_run


def evaluate_all(model, prep: Prepared, is_teacher: bool = False, world: World = SINGLE) -> EvalResult | None:
    """Every task of the suite, one after the other, into one result; on several processes each
    evaluates its share of every task's prompts and rank 0 gets the result (None elsewhere)."""
    out = EvalResult()
    for task in prep.suite.tasks:
        refs = None if is_teacher else prep.reference_teacher(task.name)
        res = evaluate_model(model, teacher=prep.teacher(), tokenizer=prep.tokenizer, inputs=prep.task_inputs(task.name),
                             task=task, spec=prep.suite.eval, device=prep.device, is_teacher=is_teacher,
                             teacher_refs=refs, teacher_prompts=prep.teacher_prompts(task.name), world=world)
        if res is None:
            continue
        out.metrics += res.metrics
        out.samples += res.samples
    return out if world.main else None


def ensure_reference_rows(engine, prep: Prepared, version_label: str, argv) -> dict[str, int]:
    """Ids of the teacher and student-init rows for this suite version, evaluating what is missing."""
    fp = reference_fingerprint(prep)
    ids = {}
    for role in (ROLE_TEACHER, ROLE_STUDENT_INIT):
        found = find_reference_run(engine, role, prep.suite.name, version_label, fp)
        if found is not None:
            ids[role] = found.id
            continue
        t0 = time.perf_counter()
        model = prep.teacher() if role == ROLE_TEACHER else prep.new_student()
        config = {"suite": prep.suite.to_dict(), "reference_fingerprint": fp, "role": role,
                  "teacher": prep.teacher_identity(), "student_keep": prep.student_keep,
                  "data_sources": prep.data_manifest}
        writer = RunWriter.start(engine, role=role, suite=prep.suite.name, suite_version=version_label, seed=0,
                                 config=config, provenance=provenance.collect(argv), setting=role)
        print(f"[kdbench] evaluating the {role} reference once for suite {prep.suite.name} v{version_label} ...")
        try:
            with torch.no_grad():
                res = evaluate_all(model, prep, is_teacher=role == ROLE_TEACHER)
            writer.results(res.metrics, res.samples)
            writer.finish(wall_time_s=time.perf_counter() - t0)
        except BaseException as exc:
            writer.fail(f"{type(exc).__name__}: {exc}")
            raise
        ids[role] = writer.run_id
        del model
    return ids
