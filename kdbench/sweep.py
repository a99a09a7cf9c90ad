"""``kdbench sweep``: running the jobs a sweep's specification expands into (what to run, and
its checks, are kdbench/sweep_spec.py's) -- each suite prepared once, finished runs skipped,
interrupted ones resumed, worker processes with their logs, progress and the summary.

The jobs, one ``kdbench run`` each, run in ``--workers N`` processes that split the machine's
cores between them (threads per worker set explicitly: on 2 cores a second 2-thread torch
process slows a running one ~10×); on a machine with GPUs each worker owns one
(``CUDA_VISIBLE_DEVICES``: :func:`worker_gpus`). Before any worker starts, ``kdbench prepare`` builds what the
jobs share once per suite — the (fine-tuned) teacher, the teacher cache, the reference rows — so
workers never race to build them. A job whose configuration hash (``runs.config_hash``) already
has a finished run is skipped; one whose run was interrupted with a checkpoint is resumed
(``kdbench run --resume``). A failed job does not stop the sweep; the summary names it.

Each job is one :class:`kdbench.config.RunConfig`, handed to its ``kdbench run`` process whole,
as JSON (``kdbench run --config-json <job key>.json`` in the sweep's log folder), never
re-serialised to flags; ``kdbench prepare`` gets its configuration the same way.
``--dry-run`` prints, per job, the ``kdbench run`` command line that gives the same
configuration (:func:`kdbench.config.command_line`; for a cluster scheduler). A store URL with a
password is never put on a command line nor in a job's file: the jobs read it from
``$KDBENCH_DB``.

With a tuning grid (``--tune lr=1e-4,3e-4``), the summary reports, per objective setting, the
grid point with the best **validation** score (the suite's checkpoint-selection score, mean over
training seeds) — never the test score.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from kdbench.config import RunConfig, to_json
from kdbench.errors import UserError
from kdbench.secrets import redact_url
from kdbench.store.location import resolve_url
from kdbench.store.models import DB_ENV_VAR
from kdbench.sweep_spec import Job, SweepSpec, expand, sweep_id


def _status(engine, jobs: list[Job], fingerprints: dict[str, str] | None = None) -> dict[str, tuple[str, int, bool]]:
    """config_hash -> (effective status, run id, has a saved train state) of the run to act on:
    a finished one if any, else the newest. With ``fingerprints`` ({job key: the reference
    fingerprint this machine's preparation gives}), runs recorded under another teacher are left
    out: they are another machine kind's (or another fine-tune's) results, not this job's."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from kdbench.lifecycle import effective_status
    from kdbench.store import Run

    out: dict[str, tuple[str, int]] = {}
    with Session(engine) as s:
        rows = s.scalars(select(Run).where(Run.config_hash.in_([j.key for j in jobs])).order_by(Run.id)).all()
        for r in rows:
            fp = (r.config or {}).get("reference_fingerprint")
            if fingerprints is not None and fp is not None and fingerprints.get(r.config_hash) not in (None, fp):
                continue
            st = effective_status(r)
            prev = out.get(r.config_hash)
            if prev is None or prev[0] != "finished":
                out[r.config_hash] = (st, r.id, bool(r.state_path and Path(r.state_path, "state").exists()))
    return out


def _has_secret(db: str) -> bool:
    from kdbench.secrets import parse_url, secret_parts

    try:
        return secret_parts(parse_url(resolve_url(db)))
    except Exception:  # not a URL: a path holds no password
        return False


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def worker_gpus(device: str, workers: int, per_run: int = 1) -> list[str] | None:
    """The GPUs each worker slot owns (``CUDA_VISIBLE_DEVICES`` of the jobs it runs, ``per_run``
    of them: a job of ``--gpus-per-run K`` is one run on K processes), or None where the jobs do
    not choose their GPU this way: on the CPU, and for an explicit ``cuda:N`` (every job on that
    GPU, as asked). With ``auto`` or ``cuda`` on a machine with GPUs, worker ``i`` gets the
    ``i``-th ``per_run`` visible GPUs (an existing ``CUDA_VISIBLE_DEVICES`` is honoured: its
    entries, numbers or UUIDs, are handed out), so two runs never share one GPU's memory and
    clock; more than there are is refused in one line, and so is ``per_run`` > 1 without GPUs."""
    import torch

    from kdbench.device import resolve_device

    if resolve_device(device).type != "cuda" or device.startswith("cuda:"):
        if per_run > 1:
            raise UserError(f"--gpus-per-run {per_run} needs the jobs on CUDA (--device auto or cuda on a machine with "
                            f"GPUs); device {device} resolves to {resolve_device(device)}")
        return None
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = ([g.strip() for g in given.split(",") if g.strip()] if given is not None
               else [str(i) for i in range(torch.cuda.device_count())])
    if workers * per_run > len(visible):
        each = "a GPU" if per_run == 1 else f"{per_run} GPUs"
        raise UserError(f"--workers {workers} with {len(visible)} visible GPU(s): a sweep gives each worker {each} of "
                        f"its own; use --workers {len(visible) // per_run} or fewer, or --device cpu")
    return [",".join(visible[i * per_run:(i + 1) * per_run]) for i in range(workers)]


def _gpu_note(gpus: list[str], per_run: int) -> str:
    if per_run == 1:
        return ", one GPU each (" + ", ".join(gpus) + ")"
    return f", {per_run} GPUs each, one run on {per_run} processes (" + "; ".join(gpus) + ")"


def run_sweep(spec: SweepSpec, *, dry_run: bool = False, out=print) -> int:
    from kdbench.store import display_name, open_engine

    jobs = expand(spec)
    sid = sweep_id(jobs)
    # A store URL with a password is never printed nor put on a command line (`ps` shows those):
    # the jobs read it from $KDBENCH_DB.
    secret = bool(spec.db) and _has_secret(spec.db)
    db_flag = None if secret else spec.db
    if dry_run:
        out(f"# kdbench sweep {sid}: {len(jobs)} runs; one command line each (add OMP_NUM_THREADS for your machine)")
        if secret:
            out(f"# store {redact_url(resolve_url(spec.db))}: its password is not printed; these lines read the store "
                f"from ${DB_ENV_VAR} — export {DB_ENV_VAR}='<the URL with its password>' before running them")
        for j in jobs:
            out(shlex.join(j.argv(sid, db_flag)))
        return 0
    # every job runs on this machine: a GPU it lacks (or fewer GPUs than workers) is refused
    # before anything is written (a dry run's lines may be meant for another machine: not checked)
    gpus = worker_gpus((spec.run or {}).get("device", "auto"), spec.workers, spec.gpus_per_run)
    engine = open_engine(spec.db)
    logs = _log_dir(sid)
    threads = threads_per_worker(spec.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if secret:
        env[DB_ENV_VAR] = resolve_url(spec.db)
    t0 = time.perf_counter()
    state = _status(engine, jobs)
    prepared = False
    if any(st[0] == "finished" for st in state.values()):
        # A finished run counts only if it was made under the teacher this machine prepares: the same
        # suite fine-tunes its teacher differently on another machine kind (reference fingerprint).
        fps = _prepare_suites(spec, jobs, env, logs, out, db_flag)
        prepared = True
        other = sum(1 for j in jobs if state.get(j.key, ("",))[0] == "finished")
        state = _status(engine, jobs, fps)
        other -= sum(1 for j in jobs if state.get(j.key, ("",))[0] == "finished")
        if other:
            out(f"[sweep {sid}] {other} finished run(s) in the store were made under another teacher (reference "
                f"fingerprint differs from this machine's): they are run again here, not skipped")
    todo, skipped = [], []
    for j in jobs:
        st = state.get(j.key)
        if st and st[0] == "finished":
            skipped.append(j)
        else:
            todo.append((j, st[1] if st and st[0] == "interrupted" and st[2] else None))
    out(f"[sweep {sid}] {len(jobs)} runs: {len(skipped)} already finished, {len(todo)} to run "
        f"({sum(1 for _, r in todo if r)} to resume) on {spec.workers} worker(s) × {threads} thread(s)"
        f"{'' if gpus is None else _gpu_note(gpus, spec.gpus_per_run)}; store {display_name(engine)}")
    if not todo:
        return 0
    if not prepared:
        _prepare_suites(spec, [j for j, _ in todo], env, logs, out, db_flag)
    failed: list[tuple[Job, str]] = []
    done = 0
    durations: list[float] = []
    queue = list(todo)
    running: dict = {}
    free_gpus = list(gpus or [])  # a finished job's GPU goes back to the next one
    while queue or running:
        while queue and len(running) < spec.workers:
            job, resume_id = queue.pop(0)
            gpu = free_gpus.pop(0) if gpus else None
            if resume_id is None:  # the job's configuration, whole, as JSON (never re-serialised to flags)
                argv = ["kdbench", "run", "--config-json", str(_write_config(logs / f"{job.key}.json",
                                                                             job.run_config(sid, db_flag)))]
            else:  # a resume takes only the store and the progress bar; the run keeps its configuration
                argv = ["kdbench", "run", "--resume", str(resume_id), "--no-progress"] + (["--db", db_flag] if db_flag
                                                                                          else [])
            log = logs / f"{job.key}.log"
            fh = open(log, "a")
            proc = subprocess.Popen([sys.executable, "-m", "kdbench", *argv[1:]], stdout=fh,
                                    stderr=subprocess.STDOUT,
                                    env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu})
            running[proc] = (job, time.perf_counter(), fh, log, gpu)
            out(f"[sweep {sid}] start  {job.setting} seed {job.seed} on {job.suite} v{job.label}"
                f"{'' if gpu is None else (' on GPU ' if ',' not in gpu else ' on GPUs ') + gpu}"
                f"{' (resume run ' + str(resume_id) + ')' if resume_id else ''}")
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            job, started, fh, log, gpu = running.pop(proc)
            fh.close()
            if gpu is not None:
                free_gpus.append(gpu)
            durations.append(time.perf_counter() - started)
            done += 1
            if proc.returncode != 0:
                failed.append((job, _last_line(log)))
            left = len(queue) + len(running)
            eta = sum(durations) / len(durations) * left / spec.workers
            out(f"[sweep {sid}] {'FAILED' if proc.returncode else 'done  '} {job.setting} seed {job.seed} in "
                f"{durations[-1] / 60:.1f} min; {done}/{len(todo)} done, {len(failed)} failed, elapsed "
                f"{(time.perf_counter() - t0) / 60:.1f} min, ETA {eta / 60:.1f} min")
    out(f"[sweep {sid}] finished {done} run(s) in {(time.perf_counter() - t0) / 60:.1f} min; "
        f"{len(skipped)} skipped, {len(failed)} failed")
    for job, why in failed:
        out(f"[sweep {sid}]   failed: {job.setting} seed {job.seed}: {why} (log {logs / (job.key + '.log')})")
    if spec.tune:
        for line in tuning_report(engine, jobs):
            out(f"[sweep {sid}] {line}")
    return 1 if failed else 0


def _prepare_suites(spec: SweepSpec, jobs: list[Job], env, logs: Path, out, db: str | None) -> dict[str, str]:
    """One `kdbench prepare` per distinct suite configuration, before any worker starts; returns
    {job key: the reference fingerprint of the teacher prepared for it}."""
    seen: dict[tuple, str] = {}
    fps: dict[str, str] = {}
    for job in jobs:
        ident = (job.suite, json.dumps(spec.run, sort_keys=True), job.train.get("lr"))
        if ident not in seen:
            info = logs / f"prepare-{len(seen)}.json"
            config = _write_config(logs / f"prepare-{len(seen)}-config.json", job.run_config(None, db))
            argv = ["prepare", "--config-json", str(config), "--info-json", str(info)]
            out(f"[sweep] preparing {job.suite} (teacher, teacher cache, reference rows) ...")
            with open(logs / f"prepare-{job.suite}.log", "a") as fh:
                rc = subprocess.run([sys.executable, "-m", "kdbench", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    env={**env, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}).returncode
            if rc != 0:
                raise UserError(f"preparing suite {job.suite} failed; see {logs / f'prepare-{job.suite}.log'}")
            seen[ident] = json.loads(info.read_text())["reference_fingerprint"]
        fps[job.key] = seen[ident]
    return fps


def _write_config(path: Path, config: RunConfig) -> Path:
    """A job's RunConfig as JSON (kdbench/config.py to_json), for ``--config-json``."""
    path.write_text(to_json(config))
    return path


def tuning_report(engine, jobs: list[Job]) -> list[str]:
    """Per objective setting: the tuned value with the best mean validation score (never test)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from kdbench.store import CurvePoint, Run

    scores: dict[tuple[str, str], dict] = {}
    with Session(engine) as s:
        for j in jobs:
            run = s.scalars(select(Run).where(Run.config_hash == j.key, Run.status == "finished")
                            .order_by(Run.id.desc())).first()
            if run is None:
                continue
            vals = [c.terms for c in s.scalars(select(CurvePoint).where(CurvePoint.run_id == run.id,
                                                                        CurvePoint.split == "valid"))]
            best = max((v for t in vals for v in t.values()), default=None)
            if best is None:
                continue
            point = json.dumps(j.train, sort_keys=True)
            scores.setdefault((j.suite, j.setting), {}).setdefault(point, []).append(best)
    lines = []
    for (suite, setting), by_point in sorted(scores.items()):
        means = {p: sum(v) / len(v) for p, v in by_point.items()}
        best = max(means, key=means.get)
        others = ", ".join(f"{json.loads(p)}: {m:.2f}" for p, m in sorted(means.items()))
        lines.append(f"tuned on validation: {setting} on {suite} -> {json.loads(best)} ({others})")
    if not lines:
        lines.append("tuning: no validation scores recorded (the suite selects no checkpoint on validation)")
    return lines


def _log_dir(sid: str) -> Path:
    from kdbench.diskcache import cache_dir

    d = cache_dir() / "sweeps" / sid
    d.mkdir(parents=True, exist_ok=True)
    return d


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errs = [ln for ln in lines if ln.startswith("kdbench:")]
    return (errs or lines or ["no output"])[-1][:300]
