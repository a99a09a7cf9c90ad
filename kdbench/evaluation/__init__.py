"""Evaluation: decode, score, and the protocol that runs a model on a suite's tasks.

* :mod:`~kdbench.evaluation.sampling`      prefill / decode with the KV cache, keyed draws (the sampler an
  on-policy trainer calls too), scoring continuations
* :mod:`~kdbench.evaluation.decoder`       a model over one task's prompts, one batch at a time: each batch
  prefilled once, used by every decode and score of it, then dropped
* :mod:`~kdbench.evaluation.scoring`       per-task metrics of one decode (definitions in kdbench/metrics/)
* :mod:`~kdbench.evaluation.protocol`      one model on one task: decodes, teacher scores, reference KL
  (:func:`~kdbench.evaluation.protocol.evaluate_model`); the checkpoint-selection score
* :mod:`~kdbench.evaluation.prompt_cache`  the teacher's prefill of the evaluation prompts, kept between runs

It imports nothing from the training engine (kdbench/engine/; tests/test_layering.py): models
are run through kdbench/modeling.py, packed sequences are kdbench/data/batching.py's, and a
teacher source (engine/teacher.py) is used through its two members, ``hidden(batch)`` and
``head``.
"""
