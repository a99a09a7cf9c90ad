"""How a crash-safety test stops a real ``kdbench`` process at a named point: the environment
that loads tests/faults/sitecustomize.py into it (the points are listed there)."""

from __future__ import annotations

import os
from pathlib import Path

FAULTS = Path(__file__).resolve().parent / "faults"


def fault_env(env: dict, point: str) -> dict:
    """``env`` with the fault ``point`` armed (also in the processes the command starts)."""
    path = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH", "")) if p)
    return {**env, "KDBENCH_FAULT_AT": point, "PYTHONPATH": path}
