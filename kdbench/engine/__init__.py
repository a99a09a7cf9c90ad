"""The distillation engine: one trainer with injected parts.

* :mod:`~kdbench.engine.batches`       where training data comes in: packed batches with a cursor
* :mod:`~kdbench.engine.teacher`       teacher sources: live, or the exact on-disk cache
* :mod:`~kdbench.engine.teacher_cache` that cache (content-addressed, memory-mapped, atomic)
* :mod:`~kdbench.engine.prompt_cache`  the teacher's prefill of the evaluation prompts, kept between runs
* :mod:`~kdbench.engine.forward`       final hidden states at counted positions; head check
* :mod:`~kdbench.engine.check`         the start-up check: chunked path == dense reference
* :mod:`~kdbench.engine.state`         the train state (the resume seam) and the schedule
* :mod:`~kdbench.engine.trainer`       the loop, top to bottom

Each part's contract, and where on-policy sampling and scale-out plug in: docs/engine.md.
The objective's math is below all of this (kdbench/losses.py, kdbench/objective.py); the
precision and device helpers are in kdbench/device.py.
"""
