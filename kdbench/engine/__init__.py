"""The distillation engine: one trainer with injected parts.

* :mod:`~kdbench.engine.batches`       where training data comes in: packed batches with a cursor
* :mod:`~kdbench.engine.teacher`       teacher sources: live, or the exact on-disk cache
* :mod:`~kdbench.engine.teacher_cache` that cache (content-addressed, memory-mapped, atomic)
* :mod:`~kdbench.engine.check`         the start-up check: chunked path == dense reference
* :mod:`~kdbench.engine.fsdp`          FSDP2: the student sharded, its loss inside the forward, sharded checkpoints
* :mod:`~kdbench.engine.state`         the train state (the resume seam) and the schedule
* :mod:`~kdbench.engine.trainer`       the loop, top to bottom
* :mod:`~kdbench.engine.tuning`        the step's settings per device (chunks, checkpointing, attention)

Each part's contract, and where on-policy sampling and scale-out plug in: docs/engine.md.
Below the engine (it imports them, they never import it): the objective's math
(kdbench/losses.py, kdbench/objective.py), the model plumbing shared with evaluation (final
hidden states, the output head, StudentBody: kdbench/modeling.py), the packed batch
(kdbench/data/batching.py), the caches' common ground (kdbench/diskcache.py) and the precision
and device helpers (kdbench/device.py). The layers: docs/engine.md ("Layers").
"""
