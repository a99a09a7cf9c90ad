"""``kdbench sweep``: objectives × parameter grids × tuning grid × training seeds × suites.

A sweep expands its specification (a YAML file or flags) into jobs, one ``kdbench run`` each,
and runs them with ``--workers N`` processes that split the machine's cores between them
(threads per worker set explicitly: on 2 cores a second 2-thread torch process slows a
running one ~10×). Before any worker starts, ``kdbench prepare`` builds what the jobs share
once per suite — the (fine-tuned) teacher, the teacher cache, the reference rows — so workers
never race to build them. A job whose configuration hash (``runs.config_hash``) already has
a finished run is skipped; one whose run was interrupted with a checkpoint is resumed
(``kdbench run --resume``). A failed job does not stop the sweep; the summary names it.
``--dry-run`` prints the exact ``kdbench run`` command lines (for a cluster scheduler).

Equal tuning budget: ``--tune lr=1e-4,3e-4`` gives every objective the same grid; the summary
reports, per objective setting, the grid point with the best **validation** score (the suite's
checkpoint-selection score, mean over training seeds) — never the test score.

Specification file (every key optional except objectives)::

    suites: [micro]
    objectives: [ce, kl, rkl, csd_ss, "csd(w1=T,w2=S,tau=1.5)", tvd]
    seeds: [0, 1, 2]
    params: {tau: [1.0, 1.5]}        # applied to the objectives that declare the parameter
    tune: {lr: [1.0e-4, 3.0e-4]}
    workers: 1
    run: {steps: 3, eval_limit: 3}   # any `kdbench run` option, for every job
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.errors import UserError

TUNABLE = ("lr",)                     # TrainSpec fields `--tune` may grid over (a `kdbench run --lr` each)
RUN_OPTIONS = {"steps": "--steps", "eval_limit": "--eval-limit", "finetune_steps": "--finetune-steps", "pair": "--pair", "teacher": "--teacher",
               "student": "--student", "data_dir": "--data-dir", "device": "--device",
               "teacher_source": "--teacher-source", "lr": "--lr"}
RUN_FLAGS = {"no_save": "--no-save", "teacher_finetuned": "--teacher-finetuned", "keep_activations": "--keep-activations"}


@dataclass
class SweepSpec:
    objectives: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    suites: list[str] = field(default_factory=lambda: ["micro"])
    params: dict[str, list] = field(default_factory=dict)
    tune: dict[str, list] = field(default_factory=dict)
    workers: int = 1
    run: dict = field(default_factory=dict)
    db: str | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "SweepSpec":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise UserError(f"sweep file {path} not found")
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"sweep file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(doc, dict):
            raise UserError(f"sweep file {path}: expected a mapping of keys (objectives, seeds, ...)")
        known = {"objectives", "seeds", "suites", "params", "tune", "workers", "run", "db"}
        unknown = set(doc) - known
        if unknown:
            raise UserError(f"sweep file {path}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(known))}")
        doc.update({k: v for k, v in overrides.items() if v not in (None, [], {})})
        if not doc.get("objectives"):
            raise UserError(f"sweep file {path}: needs a list of objectives")
        return cls(**{k: v for k, v in doc.items()})


@dataclass
class Job:
    suite: str
    objective: str               # a setting string (name or name(k=v,...))
    params: dict                 # grid parameters of the objective
    train: dict                  # tuned TrainSpec overrides (lr)
    seed: int
    key: str = ""                # runs.config_hash of its run
    setting: str = ""
    label: str = ""

    def argv(self, spec: SweepSpec, sweep_id: str) -> list[str]:
        args = ["kdbench", "run", "--objective", self.objective, "--suite", self.suite, "--seed", str(self.seed)]
        for k, v in self.params.items():
            args += ["--param", f"{k}={v}"]
        for k, v in {**spec.run, **self.train}.items():
            if k in RUN_FLAGS:
                if v:
                    args.append(RUN_FLAGS[k])
            else:
                args += [RUN_OPTIONS[k], str(v)]
        if spec.db:
            args += ["--db", spec.db]
        return args + ["--sweep-id", sweep_id, "--no-progress"]


def _grid(values: dict[str, list]) -> list[dict]:
    keys = sorted(values)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))] or [{}]


def _as_list(name: str, value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def expand(spec: SweepSpec) -> list[Job]:
    """Every job of the sweep, validated (unknown objectives, parameters, suites and run options
    are one-line errors), with its configuration hash and version label resolved."""
    from kdbench.config import RunRequest, resolve_suite, run_key
    from kdbench.registry import get_objective

    if spec.workers < 1:
        raise UserError("--workers must be at least 1")
    bad = set(spec.run) - set(RUN_OPTIONS) - set(RUN_FLAGS)
    if bad:
        raise UserError(f"sweep run option(s) {', '.join(sorted(bad))} unknown; known: "
                        f"{', '.join(sorted(set(RUN_OPTIONS) | set(RUN_FLAGS)))}")
    bad = set(spec.tune) - set(TUNABLE)
    if bad:
        raise UserError(f"--tune {', '.join(sorted(bad))}: only {', '.join(TUNABLE)} can be tuned")
    params = {k: _as_list(k, v) for k, v in spec.params.items()}
    tune = {k: [float(x) for x in _as_list(k, v)] for k, v in spec.tune.items()}
    seeds = [int(s) for s in _as_list("seeds", spec.seeds)]
    jobs: list[Job] = []
    for suite_name in _as_list("suites", spec.suites):
        for name in spec.objectives:
            try:
                base = get_objective(name)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            own = {k: v for k, v in params.items() if any(p.name == k for p in base.spec.params)}
            for combo in _grid(own):
                try:
                    obj = get_objective(name, **combo)
                except ValueError as exc:
                    raise UserError(str(exc)) from None
                for train in _grid(tune):
                    for seed in seeds:
                        req = RunRequest(objective=name, params=combo, suite=suite_name, seed=seed,
                                         steps=spec.run.get("steps"), eval_limit=spec.run.get("eval_limit"),
                                         finetune_steps=spec.run.get("finetune_steps"),
                                         pair=spec.run.get("pair"), teacher=spec.run.get("teacher"),
                                         student=spec.run.get("student"), data_dir=spec.run.get("data_dir"),
                                         teacher_finetuned=bool(spec.run.get("teacher_finetuned")),
                                         lr=train.get("lr"))
                        _, label = resolve_suite(req)
                        jobs.append(Job(suite_name, name, {k: str(v) for k, v in combo.items()}, train, seed,
                                        run_key(obj, suite_name, label, seed), obj.setting, label))
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise UserError("the sweep names the same run twice (an alias and its setting?); remove the duplicate")
    return jobs


def sweep_id(jobs: list[Job]) -> str:
    """The same specification gives the same id, so a sweep started again continues itself."""
    return hashlib.sha256("\n".join(sorted(j.key for j in jobs)).encode()).hexdigest()[:12]


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


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def run_sweep(spec: SweepSpec, *, dry_run: bool = False, out=print) -> int:
    from kdbench.store import display_name, open_engine

    jobs = expand(spec)
    sid = sweep_id(jobs)
    if dry_run:
        out(f"# kdbench sweep {sid}: {len(jobs)} runs; one command line each (add OMP_NUM_THREADS for your machine)")
        for j in jobs:
            out(shlex.join(j.argv(spec, sid)))
        return 0
    engine = open_engine(spec.db)
    logs = _log_dir(sid)
    threads = threads_per_worker(spec.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    state = _status(engine, jobs)
    prepared = False
    if any(st[0] == "finished" for st in state.values()):
        # A finished run counts only if it was made under the teacher this machine prepares: the same
        # suite fine-tunes its teacher differently on another machine kind (reference fingerprint).
        fps = _prepare_suites(spec, jobs, env, logs, out)
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
        f"({sum(1 for _, r in todo if r)} to resume) on {spec.workers} worker(s) × {threads} thread(s); "
        f"store {display_name(engine)}")
    if not todo:
        return 0
    if not prepared:
        _prepare_suites(spec, [j for j, _ in todo], env, logs, out)
    failed: list[tuple[Job, str]] = []
    done = 0
    durations: list[float] = []
    queue = list(todo)
    running: dict = {}
    while queue or running:
        while queue and len(running) < spec.workers:
            job, resume_id = queue.pop(0)
            argv = job.argv(spec, sid) if resume_id is None else \
                ["kdbench", "run", "--resume", str(resume_id), "--no-progress"] + (["--db", spec.db] if spec.db else [])
            log = logs / f"{job.key}.log"
            fh = open(log, "a")
            proc = subprocess.Popen([sys.executable, "-m", "kdbench", *argv[1:]], stdout=fh,
                                    stderr=subprocess.STDOUT, env=env)
            running[proc] = (job, time.perf_counter(), fh, log)
            out(f"[sweep {sid}] start  {job.setting} seed {job.seed} on {job.suite} v{job.label}"
                f"{' (resume run ' + str(resume_id) + ')' if resume_id else ''}")
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            job, started, fh, log = running.pop(proc)
            fh.close()
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


def _prepare_suites(spec: SweepSpec, jobs: list[Job], env, logs: Path, out) -> dict[str, str]:
    """One `kdbench prepare` per distinct suite configuration, before any worker starts; returns
    {job key: the reference fingerprint of the teacher prepared for it}."""
    seen: dict[tuple, str] = {}
    fps: dict[str, str] = {}
    for job in jobs:
        ident = (job.suite, json.dumps(spec.run, sort_keys=True), job.train.get("lr"))
        if ident not in seen:
            info = logs / f"prepare-{len(seen)}.json"
            argv = ["prepare"] + job.argv(spec, "prepare")[2:] + ["--info-json", str(info)]
            out(f"[sweep] preparing {job.suite} (teacher, teacher cache, reference rows) ...")
            with open(logs / f"prepare-{job.suite}.log", "a") as fh:
                rc = subprocess.run([sys.executable, "-m", "kdbench", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    env={**env, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}).returncode
            if rc != 0:
                raise UserError(f"preparing suite {job.suite} failed; see {logs / f'prepare-{job.suite}.log'}")
            seen[ident] = json.loads(info.read_text())["reference_fingerprint"]
        fps[job.key] = seen[ident]
    return fps


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
    from kdbench.models import cache_dir

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
