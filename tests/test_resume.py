"""Crash safety end to end: real `kdbench run` processes killed (SIGKILL) during training, during
evaluation and while writing, or stopped with SIGTERM, then `kdbench run --resume`: the result
equals the uninterrupted run's, bit for bit on CPU, and the store holds one finished run with a
curve that has no step twice. Tiny random models with the real tokenizer, GSM8K-style data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.cli import main
from kdbench.store import CurvePoint, Metric, Run, Sample, open_engine

ROOT = Path(__file__).resolve().parent.parent
try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "KDBENCH_CHECKPOINT_EVERY_S": "0"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    teacher, student = make_tiny_pair(tmp / "models")
    data = tmp / "data" / "gsm8k"
    data.mkdir(parents=True)
    for name, n in (("train", 40), ("test", 2)):
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + {i % 7}?", "answer": f"{i} + {i % 7} = {i + i % 7} #### {i + i % 7}"})
            + "\n" for i in range(n)))
    args = ["run", "--objective", "csd", "--suite", "paper-task-gsm8k", "--teacher", str(teacher),
            "--teacher-finetuned", "--student", str(student), "--data-dir", str(tmp / "data"), "--steps", "4",
            "--eval-limit", "2", "--no-save", "--no-progress"]
    ref_db = tmp / "straight.db"
    proc = subprocess.run([sys.executable, "-m", "kdbench", *args, "--db", str(ref_db)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"tmp": tmp, "args": args, "reference": result_of(ref_db)}


def result_of(db: Path) -> dict:
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        runs = s.scalars(select(Run).where(Run.role == "distilled")).all()
        assert len(runs) == 1, [(r.id, r.status) for r in runs]
        run = runs[0]
        metrics = sorted((m.task, m.metric, m.seed, m.value) for m in s.scalars(select(Metric).where(Metric.run_id == run.id)))
        samples = sorted((x.prompt_id, x.seed, x.output) for x in s.scalars(select(Sample).where(Sample.run_id == run.id)))
        curve = [(c.split, c.step, c.loss) for c in s.scalars(select(CurvePoint).where(CurvePoint.run_id == run.id))]
        out = {"status": run.status, "id": run.id, "metrics": metrics, "samples": samples, "curve": curve,
               "selected_step": run.selected_step}
    engine.dispose()
    return out


def start_and_stop_at(world, db: Path, point: str, sig=signal.SIGKILL) -> int:
    """Start a real run, wait until it reaches the fault point, send ``sig``; return its exit code."""
    env = {**ENV, "KDBENCH_FAULT_AT": point}
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", *world["args"], "--db", str(db)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if line.startswith("KDBENCH_FAULT_POINT"):
            break
        assert time.monotonic() < deadline, "the run never reached its fault point"
    else:
        pytest.fail(f"the run ended before its fault point {point} (exit {proc.wait()})")
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=120)
    finally:
        proc.stderr.close()


def resume(db: Path, run_id: int) -> subprocess.CompletedProcess:
    """``kdbench run --resume`` in its own process with the reference run's environment (thread
    count included: CPU float sums may depend on it, and the test asks for bit-identical)."""
    return subprocess.run([sys.executable, "-m", "kdbench", "run", "--resume", str(run_id), "--db", str(db),
                           "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)


def only_run(db: Path) -> Run:
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        (run,) = s.scalars(select(Run).where(Run.role == "distilled")).all()
        s.expunge_all()
    engine.dispose()
    return run


@pytest.mark.parametrize("point", ["training@2", "evaluation", "writing"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(world, point, capsys):
    db = world["tmp"] / f"killed-{point.replace('@', '-')}.db"
    assert start_and_stop_at(world, db, point) == -signal.SIGKILL
    killed = only_run(db)
    assert killed.status == "running"  # what the row says; the process is gone:
    assert main(["show", str(killed.id), "--db", str(db)]) == 0
    assert "interrupted" in capsys.readouterr().out
    proc = resume(db, killed.id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = result_of(db)
    ref = world["reference"]
    assert got["status"] == "finished" and got["id"] == killed.id  # the same row, one run
    assert got["metrics"] == ref["metrics"] and got["samples"] == ref["samples"]  # bit-identical
    assert got["selected_step"] == ref["selected_step"]
    steps = [(split, step) for split, step, _ in got["curve"]]
    assert len(steps) == len(set(steps))  # no duplicate curve points
    assert sorted(got["curve"]) == sorted(ref["curve"])


def test_sigterm_checkpoints_and_records_interrupted(world, capsys):
    db = world["tmp"] / "sigterm.db"
    rc = start_and_stop_at(world, db, "training@2", sig=signal.SIGTERM)
    assert rc == 130
    run = only_run(db)
    assert run.status == "interrupted" and "kdbench run --resume" in run.error
    assert (Path(run.state_path) / "state" / "state.json").is_file()
    assert json.loads((Path(run.state_path) / "state" / "state.json").read_text())["train"]["step"] == 2
    proc = resume(db, run.id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = result_of(db)
    assert got["metrics"] == world["reference"]["metrics"]
    assert not Path(run.state_path).exists()  # a finished run keeps no train state


def test_resume_refuses_what_cannot_be_resumed(world, capsys):
    db = world["tmp"] / "sigterm.db"  # its run finished above
    run = only_run(db)
    assert main(["run", "--resume", str(run.id), "--db", str(db)]) == 2
    assert "finished" in capsys.readouterr().err
    assert main(["run", "--resume", "999", "--db", str(db)]) == 2
    assert main(["run", "--resume", str(run.id), "--objective", "kl", "--db", str(db)]) == 2
    assert main(["run", "--resume", str(run.id), "--keep-activations", "--db", str(db)]) == 2
    assert "takes only --db and --no-progress" in capsys.readouterr().err  # the run keeps its own setting


def test_resume_after_an_intermediate_best_was_kept(world):
    """8 steps with validation every epoch (here every 5 steps, then at the last): the first
    validation's weights are kept as the best so far (a file beside the train state, hard-linked
    into the checkpoint); the run is killed two steps later and resumed into its own directory —
    the best file is adopted, not copied onto itself — and gives the uninterrupted result."""
    args = list(world["args"])
    args[args.index("--steps") + 1] = "8"
    straight = world["tmp"] / "best-straight.db"
    proc = subprocess.run([sys.executable, "-m", "kdbench", *args, "--db", str(straight)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = result_of(straight)
    first, last = sorted(step for split, step, _ in ref["curve"] if split == "valid")
    assert first < last == 8
    db = world["tmp"] / "best-killed.db"
    killed_world = {**world, "args": args}
    assert start_and_stop_at(killed_world, db, f"training@{first + 2}") == -signal.SIGKILL
    killed = only_run(db)
    kept = list(Path(killed.state_path).rglob("best.safetensors"))
    assert kept, "no best weights were kept before the kill"
    proc = resume(db, killed.id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = result_of(db)
    assert got["status"] == "finished" and got["id"] == killed.id
    assert got["metrics"] == ref["metrics"] and got["samples"] == ref["samples"]  # bit-identical
    assert got["selected_step"] == ref["selected_step"]
    steps = [(split, step) for split, step, _ in got["curve"]]
    assert len(steps) == len(set(steps)) and sorted(got["curve"]) == sorted(ref["curve"])
