"""Which run ``kdbench run --resume ID`` continues: checked, then claimed for this process before
anything heavy (torch, the models) is imported, so a second resume of the same run is refused
within a second or two, having written nothing (kdbench/lifecycle.py: one owner per run). The
resumed run itself is kdbench/recipe.py ``DistillRun.resume``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from kdbench.config import RunConfig, from_dict, resolve_suite
from kdbench.errors import UserError
from kdbench.lifecycle import Heartbeat, claim_run, effective_status, release_run, this_host
from kdbench.store import ROLE_DISTILLED, Run, display_name, get_run, open_engine, require_schema


@dataclass
class ResumeClaim:
    """A run this process now owns, with what resuming it needs. :meth:`release` gives it back
    as it was (resumable again) when the resume stops before training."""

    engine: Engine
    run: Run                 # the row as it was before the claim
    run_config: RunConfig    # the run's own configuration, with this command's store and progress bar
    folder: Path             # its train state
    owner: tuple[str, int]
    before: dict             # the row's fields the claim replaced
    heartbeat: Heartbeat

    def release(self) -> None:
        self.heartbeat.stop()
        release_run(self.engine, self.run.id, self.before, self.owner)


@dataclass
class ResumeView:
    """What a rank other than 0 of a run resumed on several processes knows of it: the run, its
    configuration and train state, read-only (rank 0 holds the claim, writes and heartbeats)."""

    run: Run
    run_config: RunConfig
    folder: Path
    engine: Engine | None = None
    owner: tuple[str, int] | None = None
    heartbeat: Heartbeat | None = None

    def release(self) -> None:
        pass


def claim_resume(run_id: int, db: str | None, *, progress: bool = True) -> ResumeClaim:
    """Check on a read-only view that run ``run_id`` can be resumed (a missing store is never
    created), then claim it. Every refusal is one line (UserError) with nothing written."""
    run, config, folder = inspect_resume(run_id, db, progress=progress)
    engine = open_engine(db)
    owner = (this_host(), os.getpid())
    before = claim_run(engine, run_id, host=owner[0], pid=owner[1])
    return ResumeClaim(engine, run, config, folder, owner, before, Heartbeat(engine, run_id, owned=True).start())


def inspect_resume(run_id: int, db: str | None, *, progress: bool = True) -> tuple[Run, RunConfig, Path]:
    """The checks of :func:`claim_resume`, read-only: ``(run, its configuration, its train state
    folder)``, or one UserError line."""
    ro = open_engine(db, readonly=True)
    try:
        require_schema(ro)
        run = get_run(ro, run_id)
        if run is None:
            raise UserError(f"no run {run_id} in the store {display_name(ro)}")
    finally:
        ro.dispose()
    if run.role != ROLE_DISTILLED or "request" not in (run.config or {}):
        raise UserError(f"run {run_id} is not a distillation run this kdbench can resume")
    status = effective_status(run)
    if status not in ("interrupted", "failed", "running"):  # running: claim_run says by whom
        raise UserError(f"run {run_id} is {status}; only interrupted (or failed) runs can be resumed")
    folder = Path(run.state_path or "") / "state"
    if not run.state_path or not ((folder / "state.json").is_file()
                                  or (folder.with_name("state.old") / "state.json").is_file()):
        raise UserError(f"run {run_id} has no saved train state ({folder}); start it again instead")
    # older rows lack options added since (their defaults apply); a newer kdbench's are refused
    config = from_dict(run.config["request"], f"run {run_id}'s stored configuration", db=db, progress=progress)
    _, label = resolve_suite(config)
    if label != run.suite_version:
        raise UserError(f"run {run_id} was filed under version {run.suite_version}; this kdbench resolves "
                        f"{label} (the suite changed): it cannot be resumed")
    return run, config, folder
