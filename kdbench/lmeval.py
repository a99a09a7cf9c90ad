"""Bridge to EleutherAI lm-evaluation-harness (``lm_eval`` 0.4.x), offline, on a local model folder.

``run_lm_eval`` runs ``lm_eval.simple_evaluate`` with the ``hf`` backend on a local Hugging Face
model folder (``pretrained=<folder>,dtype=float32``, on the device given: ``kdbench eval
--device``, default ``auto``, is CUDA when available, else the CPU) and returns a small,
JSON-serialisable summary (metric values + stderr per task, task versions, lm-eval version) that
can be stored next to a run. kdbench's own YAML tasks live in ``kdbench/tasks`` (``TASKS_DIR``);
pass that folder (or your own) as ``include_path`` -- lm-eval's default task index is then not
built (``include_defaults=False``), which saves seconds per call.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kdbench.tasks import TASKS_DIR

__all__ = ["run_lm_eval", "summarize_results", "TASKS_DIR"]

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _num(x: Any) -> float | None:
    """A JSON-safe float: numbers pass, NaN/inf/"N/A"/None become None."""
    if isinstance(x, bool):
        return float(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summarize_results(results: dict) -> dict:
    """Reduce ``simple_evaluate``'s output to ``{"lm_eval_version", "tasks": {...}, "config": {...}}``.

    Per task: ``metrics`` (``{"acc": 0.31, ...}``, the filter suffix ``,none`` dropped; other
    filters keep theirs, e.g. ``"exact_match,strict-match"``), ``stderr`` (same keys; ``None``
    when lm-eval reports "N/A"), ``version`` (the task config's ``metadata.version``),
    ``n_samples`` (``{"original", "effective"}``), ``higher_is_better``.
    """
    import lm_eval

    tasks: dict[str, dict] = {}
    versions = results.get("versions", {}) or {}
    n_samples = results.get("n-samples", {}) or {}
    hib = results.get("higher_is_better", {}) or {}
    for task, vals in (results.get("results") or {}).items():
        metrics: dict[str, float | None] = {}
        stderr: dict[str, float | None] = {}
        for key, value in vals.items():
            if key == "alias" or "," not in key:
                continue
            name, filt = key.split(",", 1)
            label = lambda base: base if filt == "none" else f"{base},{filt}"  # noqa: E731
            if name.endswith("_stderr"):
                stderr[label(name[: -len("_stderr")])] = _num(value)
            else:
                metrics[label(name)] = _num(value)
        cfg = (results.get("configs") or {}).get(task, {}) or {}
        version = versions.get(task)
        if version is None:
            version = (cfg.get("metadata") or {}).get("version")
        tasks[task] = {
            "metrics": metrics,
            "stderr": stderr,
            "version": _num(version) if version is not None else None,
            "n_samples": {k: int(v) for k, v in (n_samples.get(task) or {}).items()},
            "higher_is_better": {k: bool(v) for k, v in (hib.get(task) or {}).items()},
        }
    cfg = results.get("config") or {}
    config = {k: cfg.get(k) for k in ("model", "model_args", "batch_size", "device", "limit", "bootstrap_iters",
                                      "random_seed", "numpy_seed", "torch_seed", "fewshot_seed")}
    out = {"lm_eval_version": getattr(lm_eval, "__version__", None), "tasks": tasks, "config": config}
    return json.loads(json.dumps(out, default=str))  # guarantee JSON-serialisable


def run_lm_eval(
    model_dir: str,
    tasks: list[str],
    include_path: str | os.PathLike | list[str | os.PathLike] | None = None,
    limit: int | None = None,
    batch_size: int | str = 8,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    task_metadata: dict | None = None,
    offline: bool = True,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on a local HF model folder; return :func:`summarize_results`.

    * ``model="hf"``, ``model_args=f"pretrained={model_dir},dtype={dtype}"``, ``device`` (a concrete
      torch device string: ``cpu``, ``cuda:0``; default cpu).
    * ``include_path`` (a folder or a list of folders) given: ``TaskManager(include_path=...,
      include_defaults=False, metadata=task_metadata)`` -- only those YAML tasks are indexed
      (kdbench's own: :data:`TASKS_DIR`). ``None``: lm-eval's default task index (slow to build).
      ``task_metadata`` reaches the tasks' ``custom_dataset`` builders (kdbench's tasks read
      ``data_dir`` from it, else ``$KDBENCH_SHARED_DATA``).
    * ``limit``: documents per task (first ``limit``), ``None`` for all.
    * ``bootstrap_iters``: lm-eval's bootstrap for stderr of non-mean aggregations (1000 here,
      lm-eval's default is 100000); 0 disables stderr.
    * ``seed``: lm-eval's python / numpy / torch / few-shot seeds.
    * ``offline``: sets ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
      to 1 (``setdefault``) before importing lm-eval. Libraries read these at import, so set them
      in the environment yourself if ``huggingface_hub`` / ``datasets`` were imported earlier.

    Raises ``FileNotFoundError`` if ``model_dir`` is not a folder with a ``config.json``.
    """
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a local Hugging Face model folder (no config.json)")
    if not tasks:
        raise ValueError("no tasks given")
    if offline:
        for var in _OFFLINE_VARS:
            os.environ.setdefault(var, "1")

    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        paths = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else str(include_path)
        tm = TaskManager(include_path=paths, include_defaults=False, metadata=task_metadata)
    else:
        tm = TaskManager(metadata=task_metadata)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype={dtype}",
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=tm,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # non-zero rank
        return {}
    return summarize_results(results)


def eval_run(args) -> int:
    """`kdbench eval RUN_ID --lm-eval TASKS`: lm-eval on a run's saved student, stored beside it
    (an ``lm_eval`` artifact with the full summary, and ``lm_eval/<task>`` metric rows)."""
    from kdbench.errors import UserError
    from kdbench.store import RunWriter, get_run, open_engine

    engine = open_engine(args.db)
    run = get_run(engine, args.run_id)
    if run is None:
        raise UserError(f"no run {args.run_id} in the store")
    if run.status != "finished" or not run.checkpoint_path or not (Path(run.checkpoint_path) / "config.json").exists():
        raise UserError(f"run {args.run_id} has no saved student (status {run.status}; runs with --no-save keep none)")
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not tasks:
        raise UserError("--lm-eval needs at least one task name")
    include = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    from kdbench.device import pin_float32_matmul, resolve_device, restoring_settings

    device = resolve_device(getattr(args, "device", "auto"))
    try:
        with restoring_settings():
            pin_float32_matmul()  # float32 as the runs compute it (no TF32)
            summary = run_lm_eval(run.checkpoint_path, tasks, include_path=include, limit=args.limit,
                                  device=str(device))
    except KeyError as exc:  # lm-eval's unknown-task error
        raise UserError(f"unknown lm-eval task {exc}; kdbench's own tasks live in {TASKS_DIR}") from None
    writer = RunWriter(engine, run.id)
    writer.artifact("lm_eval", summary)
    rows = [(f"lm_eval/{task}", metric, value, None)
            for task, res in summary["tasks"].items() for metric, value in res["metrics"].items() if value is not None]
    writer.metrics(rows)
    for task, metric, value, _ in rows:
        print(f"{task:30s} {metric:20s} {value:.4f}")
    print(f"[kdbench] lm-eval results stored with run {run.id}")
    return 0
