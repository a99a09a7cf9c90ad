"""Versioned suite specs: everything a run holds fixed so objectives compare fairly.

A suite names the model pairs (teacher, student construction), the data, the optional
teacher fine-tuning, the training budget, the checkpoint rule and the evaluation tasks.
Every objective run on a suite uses exactly these settings; only the loss differs. Changing
a prompt format, a split, a task, a metric or a budget changes what a number means, so it
bumps ``version``, which is stored with every result (reference rows are recomputed for a
new version). The shapes and their defaults: kdbench/suites/spec.py; the suites:
embedded.py (``micro``, ``micro-task``) and paper.py (``paper-instruct``, ``paper-task-*``);
the whole story per suite: docs/suites.md.
"""

from __future__ import annotations

from kdbench.errors import UserError, did_you_mean
from kdbench.suites.embedded import MICRO, MICRO_TASK
from kdbench.suites.paper import (PAPER_INSTRUCT, PAPER_TASK, PAPER_TASK_DIALOGSUM, PAPER_TASK_GSM8K,
                                  PAPER_TASK_TRANSLATION)
from kdbench.suites.spec import HEADLINE, EvalSpec, PairSpec, SuiteSpec, TaskSpec, TrainSpec

__all__ = ["SUITES", "FAMILIES", "get_suite", "format_suites", "SuiteSpec", "TrainSpec", "EvalSpec", "TaskSpec",
           "PairSpec", "HEADLINE", "MICRO", "MICRO_TASK", "PAPER_INSTRUCT", "PAPER_TASK_GSM8K",
           "PAPER_TASK_DIALOGSUM", "PAPER_TASK_TRANSLATION"]

SUITES: dict[str, SuiteSpec] = {s.name: s for s in (MICRO, MICRO_TASK, PAPER_INSTRUCT, *PAPER_TASK)}

# Names that stand for several suites (one run distils one student on one task's data).
FAMILIES = {"paper-task": tuple(s.name for s in PAPER_TASK)}


def get_suite(name: str) -> SuiteSpec:
    if name in FAMILIES:
        raise UserError(f"{name!r} is a family of suites, one per task; choose one of: {', '.join(FAMILIES[name])}")
    if name not in SUITES:
        raise UserError(did_you_mean(name, sorted(SUITES), what="suite"))
    return SUITES[name]


def format_suites() -> str:
    """`kdbench list`'s suites part: name, version, tasks (kind, headline, decoding), pairs."""
    lines = []
    for s in SUITES.values():
        lines.append(f"  {s.name} (v{s.version}): {s.description}")
        tasks = ", ".join(f"{t.name} [{t.kind}: {t.headline}, {t.decoding}]" for t in s.tasks)
        lines.append(f"      tasks: {tasks}")
        for name, p in s.pairs.items():
            student = p.student.get("name") or (f"layer subset ({len(p.student['keep'])} blocks)" if "keep" in p.student
                                                else f"layer subset (every {p.student.get('keep_every')})")
            default = " (default)" if name == s.default_pair else ""
            lines.append(f"      pair {name}{default}: {p.teacher} -> {student}")
        if s.finetune is not None:
            lines.append("      teacher fine-tuned on the training split first (cached)")
    return "\n".join(lines)
