"""Fault injection for the crash-safety tests, loaded only by the processes those tests start.

A test puts this folder on ``PYTHONPATH`` and sets ``KDBENCH_FAULT_AT`` to a point of a real
run (tests/conftest.py ``fault_env``); Python imports this module at start-up, and when
``kdbench.recipe`` is imported its phases are wrapped so that the run, on reaching the point,
says ``KDBENCH_FAULT_POINT <point> rank=<RANK> pid=<pid>`` on stderr and waits to be killed (SIGKILL), or stopped
(SIGTERM ends the wait and the run goes on to its graceful stop). Points:

* ``training@N``  after step N, before that step's checkpoint decision;
* ``evaluation``  after training, before the evaluation;
* ``writing``     after the evaluation, before the results are written.

On several processes every rank stops at the point, or only rank ``KDBENCH_FAULT_RANK`` where set.

Nothing here is in kdbench: production code has no fault hook.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time

POINT = os.environ.get("KDBENCH_FAULT_AT", "")


def _wait_here(point: str) -> None:
    from kdbench.lifecycle import GRACEFUL

    # the rank and pid: a test of a run on several processes kills one of them
    print(f"KDBENCH_FAULT_POINT {point} rank={os.environ.get('RANK', '0')} pid={os.getpid()}", file=sys.stderr,
          flush=True)
    deadline = time.monotonic() + 3600
    while not GRACEFUL.requested and time.monotonic() < deadline:
        time.sleep(0.05)


def _install(recipe) -> None:
    if os.environ.get("KDBENCH_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return  # a run on several processes: only the rank KDBENCH_FAULT_RANK names stops at the point
    if POINT.startswith("training@"):
        step, on_step = int(POINT.split("@", 1)[1]), recipe.RunHooks.on_step

        def on_step_with_fault(self, state, optimizer):
            if state.step == step:
                _wait_here(POINT)
            return on_step(self, state, optimizer)

        recipe.RunHooks.on_step = on_step_with_fault
    for point, phase in (("evaluation", "evaluate"), ("writing", "record")):
        if POINT == point:
            original = getattr(recipe.DistillRun, phase)

            def with_fault(self, *a, _original=original, **k):
                _wait_here(POINT)
                return _original(self, *a, **k)

            setattr(recipe.DistillRun, phase, with_fault)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps ``kdbench.recipe``'s loading so that :func:`_install` runs right after it, without
    importing it (and torch) earlier than the command itself does."""

    def find_spec(self, name, path, target=None):
        if name != "kdbench.recipe":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            _install(module)

        spec.loader.exec_module = exec_then_install
        return spec


if POINT:
    sys.meta_path.insert(0, _AfterImport())
