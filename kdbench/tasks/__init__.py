"""lm-evaluation-harness task assets shipped with kdbench (pass this folder as ``include_path``).

``kdbench_multi30k_mc.yaml`` -- multiple-choice translation recognition on Multi30k en-de; its
documents are built by :mod:`kdbench.tasks.kdbench_task_data` from the shared data (never copied
into the repository). See :func:`kdbench.lmeval.run_lm_eval`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
