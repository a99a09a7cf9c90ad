"""RunConfig, the one source of a run's options (kdbench/config.py).

Adding a run option is one edit: a field added to RunConfig (here a subclass put in its place)
is a flag of `kdbench run` / `prepare` / `sweep`, a key of a sweep file's `run:` mapping, part of
the stored configuration of a real run and of the configuration its resume rebuilds, and of the
config hash when it is an identity option. Also: every field is a flag of `kdbench run --help`;
the `--resume` check is derived; a sweep's hand-off to its jobs (JSON) and its dry-run command
lines give back the job's configuration exactly; resolving opens nothing; and run keys are
byte-identical to those of the runs in the committed runs.db (a sweep still skips them).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench import config as C
from kdbench.cli import main
from kdbench.cli_parser import build_parser
from kdbench.errors import UserError
from kdbench.registry import get_objective
from kdbench.store import Run, open_engine
from kdbench.sweep_spec import SweepSpec, expand

ROOT = Path(__file__).resolve().parents[1]


def help_text(capsys, *command) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def parsed(argv: list[str], command: str = "run") -> C.RunConfig:
    """The RunConfig a `kdbench <command> ...` line gives (argv without the leading 'kdbench')."""
    return C.from_flags(C.given_flags(build_parser().parse_args(argv), command), command)


# ---------------------------------------------------------------------------- derived, not written by hand


def test_every_field_is_a_flag_of_run_and_the_sweeps_share_theirs(capsys):
    run = help_text(capsys, "run")
    assert [o.name for o in C.options("run")] == [f.name for f in dataclasses.fields(C.RunConfig)]
    for o in C.options("run"):
        assert f"{o.flag} " in run or f"{o.flag}\n" in run, o.flag
    prepare = help_text(capsys, "prepare")
    assert all(o.flag in prepare for o in C.options("prepare"))
    sweep = help_text(capsys, "sweep")
    every = [o for o in C.options("sweep") if o.sweep == "every"]
    assert every and all(f"passed to every run: {o.help}"[:40] in " ".join(sweep.split()) for o in every)
    assert "--sweep-id" not in sweep and "--no-progress" not in sweep  # the sweep sets them for its jobs


def test_resume_takes_only_the_options_that_say_so(tmp_path, capsys):
    assert [o.flag for o in C.options("run") if o.resume] == ["--db", "--no-progress"]
    db = tmp_path / "none.db"
    for extra in (["--seed", "0"], ["--suite", "micro"], ["--keep-activations"], ["--param", "tau=1"]):
        assert main(["run", "--resume", "1", *extra, "--db", str(db)]) == 2
        assert "takes only --db and --no-progress" in capsys.readouterr().err
    assert not db.exists()


def test_resolving_opens_nothing_and_the_store_is_its_own_step(tmp_path):
    config = C.RunConfig(objective="kl", db=str(tmp_path / "runs.db"))
    objective, suite, label = C.resolve(config)
    assert (objective.name, suite.name, label) == ("kl", "micro", suite.version)
    assert list(tmp_path.iterdir()) == []
    C.open_store(config).dispose()
    assert (tmp_path / "runs.db").is_file()


# ---------------------------------------------------------------------------- identity: the committed runs


def committed_runs() -> list[tuple[int, str, str, dict]]:
    con = sqlite3.connect(f"file:{ROOT / 'runs.db'}?mode=ro", uri=True)
    try:
        return [(rid, h, v, json.loads(req)) for rid, h, v, req in con.execute(
            "SELECT id, config_hash, suite_version, json_extract(config, '$.request') FROM runs "
            "WHERE role = 'distilled' AND config_hash IS NOT NULL")]
    finally:
        con.close()


def key_of(config: C.RunConfig) -> str:
    _, label = C.resolve_suite(config)
    return C.run_key(config, get_objective(config.objective, **config.params), label)


@pytest.fixture
def micro_v3(monkeypatch):
    """The committed runs.db holds micro v3's runs (v4 changed how samples are drawn, nothing a
    run key digests but the version): their keys are rebuilt under v3, explicitly."""
    import kdbench.suites as suites

    monkeypatch.setitem(suites.SUITES, "micro", dataclasses.replace(suites.MICRO, version="3"))


def test_run_keys_are_byte_identical_to_the_committed_runs(monkeypatch):
    """Every committed run's key, rebuilt from its stored request under its own suite version (v3's
    and v4's runs; v4's on-policy runs carry their sampler), as a resume does."""
    import kdbench.suites as suites

    rows = committed_runs()
    assert len(rows) >= 30 and {v for _, _, v, _ in rows} >= {"3", "4"}
    assert any(req.get("sampler", "off") != "off" for _, _, _, req in rows)
    for rid, stored_hash, version, request in rows:
        monkeypatch.setitem(suites.SUITES, "micro", dataclasses.replace(suites.MICRO, version=version))
        config = C.from_dict(request, f"run {rid}")
        assert C.resolve_suite(config)[1] == version
        assert key_of(config) == stored_hash, rid
    # a few written out, as a user gives them (under v3)
    monkeypatch.setitem(suites.SUITES, "micro", dataclasses.replace(suites.MICRO, version="3"))
    assert key_of(C.RunConfig(objective="csd_ss", seed=0)) == "170fbc793d8159a8007a41e299ddf899"
    assert key_of(C.RunConfig(objective="ce", seed=1, save_student=False)) == "00ea25500043740ccd315121400877f2"
    assert key_of(C.RunConfig(objective="csd", params={"w1": "T", "w2": "S", "tau": "1.5"}, seed=2,
                              keep_activations=True, device="cpu")) == "82466c2f545f40cc6e90f1dc5607bfd9"


def test_the_committed_sweep_is_still_skipped_by_hash(micro_v3):
    spec = SweepSpec(objectives=["ce", "kl", "rkl", "csd_ss", "csd(w1=T,w2=S,tau=1.5)", "tvd"], seeds=[0, 1, 2],
                     workers=2, run={"no_save": True})
    jobs = expand(spec)
    assert len(jobs) == 18 and {j.key for j in jobs} <= {h for _, h, _, _ in committed_runs()}


def test_the_committed_v4_sweeps_are_skipped_by_hash():
    """micro v4 (the suite as it is): the README's off-policy sweep and its two on-policy sweeps."""
    committed = {h for _, h, v, _ in committed_runs() if v == "4"}
    for spec in (SweepSpec(objectives=["ce", "kl", "rkl", "csd_ss", "csd(w1=T,w2=S,tau=1.5)", "tvd"], seeds=[0, 1, 2],
                           run={"no_save": True}),
                 SweepSpec(objectives=["kl", "csd_ss"], seeds=[0, 1, 2], run={"no_save": True, "sampler": "imitkd"}),
                 SweepSpec(objectives=["jsd"], seeds=[0, 1, 2], run={"no_save": True, "sampler": "gkd(lmbda=0.5)"})):
        jobs = expand(spec)
        assert {j.key for j in jobs} <= committed, spec.objectives


# ---------------------------------------------------------------------------- hand-off, stored requests


def test_a_sweep_hands_each_job_its_config_whole_and_its_dry_run_line_gives_the_same(tmp_path):
    from kdbench.cli import _run_config
    from kdbench.sweep import _write_config

    spec = SweepSpec(objectives=["kl", "csd"], seeds=[0, 7], params={"tau": ["1.5"]}, tune={"lr": [1e-4, 3e-4]},
                     run={"steps": 3, "eval_limit": 2, "no_save": True, "keep_activations": True,
                          "teacher_source": "live", "device": "cpu"})
    jobs = expand(spec)
    assert len(jobs) == 8
    for i, job in enumerate(jobs):
        config = job.run_config("abc123", "store dir/x.db")
        assert (config.steps, config.save_student, config.teacher_source, config.progress) == (3, False, "live", False)
        assert C.from_dict(json.loads(C.to_json(config)), "job") == config  # JSON round trip
        path = _write_config(tmp_path / f"{i}.json", config)
        args = build_parser().parse_args(["run", "--config-json", str(path)])
        assert _run_config(args, "run") == config  # what the job's process reads
        line = shlex.join(job.argv("abc123", "store dir/x.db"))  # what --dry-run prints
        assert line.startswith("kdbench run --objective ")
        assert parsed(shlex.split(line)[1:]) == config
    args = build_parser().parse_args(["run", "--config-json", str(path), "--seed", "1"])
    with pytest.raises(UserError, match="takes no other option"):
        _run_config(args, "run")


def test_a_stored_request_from_an_older_or_newer_kdbench():
    older = {"objective": "kl", "params": {}, "suite": "micro", "seed": 2, "save_student": False}  # no keep_activations
    config = C.from_dict(older, "run 5's stored configuration", db="x.db", progress=False)
    assert (config.keep_activations, config.seed, config.db, config.progress) == (False, 2, "x.db", False)
    with pytest.raises(UserError, match=r"does not know \(pipeline_stages\).*newer kdbench") as err:
        C.from_dict({**older, "pipeline_stages": 2}, "run 5's stored configuration")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="seed must be an integer"):
        C.from_dict({**older, "seed": "x"}, "run 5's stored configuration")
    assert C.stored_request(config) == {k: v for k, v in dataclasses.asdict(config).items()
                                        if k not in ("db", "progress")}


# ---------------------------------------------------------------------------- adding a run option is one edit


@pytest.fixture
def extended(monkeypatch):
    """RunConfig with two more fields, as a contributor would add them: an identity option and a
    provenance one. Nothing else changes."""
    base = C.RunConfig
    new = dataclasses.make_dataclass("RunConfig", [
        ("warmup_ratio", float | None, C.option(None, flag="--warmup-ratio", type=C._positive_float, identity="key",
                                                help="warm-up as a fraction of the steps (default: the suite's)")),
        ("trace", bool, C.option(False, flag="--trace", help="record a trace (default: none)")),
    ], bases=(base,))
    monkeypatch.setattr(C, "RunConfig", new)
    return base, new


def test_a_new_option_is_a_flag_of_run_prepare_and_sweep_and_a_sweep_file_key(extended, capsys):
    _, new = extended
    for command in ("run", "prepare", "sweep"):
        text = help_text(capsys, command)
        assert "--warmup-ratio" in text and "--trace" in text, command
    assert parsed(["run", "--objective", "kl", "--warmup-ratio", "0.25", "--trace"]) == \
        new(objective="kl", warmup_ratio=0.25, trace=True)
    assert main(["run", "--objective", "kl", "--warmup-ratio", "-1"]) == 2
    assert "--warmup-ratio must be a positive number" in capsys.readouterr().err
    assert main(["run", "--resume", "1", "--trace"]) == 2
    assert "takes only --db and --no-progress" in capsys.readouterr().err
    plain = expand(SweepSpec(objectives=["kl"]))[0]
    job = expand(SweepSpec(objectives=["kl"], run={"warmup_ratio": 0.5, "trace": True}))[0]
    assert (job.config.warmup_ratio, job.config.trace) == (0.5, True) and job.key != plain.key
    assert job.key == expand(SweepSpec(objectives=["kl"], run={"warmup_ratio": 0.5}))[0].key  # trace: not identity
    line = job.argv("s1", None)
    assert "--warmup-ratio" in line and "--trace" in line and parsed(line[1:]) == job.run_config("s1", None)
    with pytest.raises(UserError, match="--trace is a flag: true or false"):  # named as the flag
        expand(SweepSpec(objectives=["kl"], run={"trace": 1}))


def test_a_new_option_changes_no_existing_key(extended, micro_v3):
    base, new = extended
    for rid, stored_hash, _, request in committed_runs()[:6]:
        assert key_of(C.from_dict(request, f"run {rid}")) == stored_hash  # an old row: the new fields' defaults
        assert key_of(base(**request)) == stored_hash


@pytest.fixture(scope="module")
def tiny_gsm8k(tmp_path_factory):
    """A tiny real run: random 2-layer teacher / 1-layer student, GSM8K-style problems (as in
    tests/test_store_lifecycle.py), 2 steps."""
    try:
        from tests.tiny_models import make_tiny_gsm8k, tiny_gsm8k_suite
    except ImportError:
        from tiny_models import make_tiny_gsm8k, tiny_gsm8k_suite
    tmp = tmp_path_factory.mktemp("runconfig")
    teacher, student, data_root = make_tiny_gsm8k(tmp)
    small = tiny_gsm8k_suite()
    args = ["run", "--objective", "kl", "--suite", small.name, "--teacher", str(teacher), "--teacher-finetuned",
            "--student", str(student), "--data-dir", str(data_root), "--steps", "2", "--eval-limit", "1",
            "--no-save", "--no-progress", "--db", str(tmp / "runs.db")]
    return {"spec": small, "args": args, "db": tmp / "runs.db"}


def the_run(db: Path) -> Run:
    engine = open_engine(str(db), readonly=True)
    with Session(engine) as s:
        run = s.scalars(select(Run).where(Run.role == "distilled").order_by(Run.id.desc())).first()
        s.expunge_all()
    engine.dispose()
    return run


def test_a_new_option_reaches_a_real_run_its_hash_and_its_resume(extended, tiny_gsm8k, monkeypatch, capsys):
    """A real run with the new options, stopped after step 1 (checkpointed, as SIGTERM stops it),
    then resumed: the stored configuration, the config hash and the resumed run's RunConfig all
    carry them."""
    import torch

    from kdbench import recipe, suites
    from kdbench.lifecycle import GRACEFUL

    base, new = extended
    monkeypatch.setitem(suites.SUITES, tiny_gsm8k["spec"].name, tiny_gsm8k["spec"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("KDBENCH_CHECKPOINT_EVERY_S", "0")
    torch.set_num_threads(1)

    on_step = recipe.RunHooks.on_step

    def stop_after_step_1(self, state, optimizer):  # SIGTERM's path: checkpoint at the end of the step, then stop
        if state.step == 1:
            GRACEFUL.requested = True
        return on_step(self, state, optimizer)

    monkeypatch.setattr(recipe.RunHooks, "on_step", stop_after_step_1)
    seen = []  # the RunConfig each run starts from
    setup = recipe.DistillRun.setup

    def spy(self, *a, **k):
        seen.append(self.run_config)
        return setup(self, *a, **k)

    monkeypatch.setattr(recipe.DistillRun, "setup", spy)

    try:
        assert main([*tiny_gsm8k["args"], "--warmup-ratio", "0.5", "--trace"]) == 130
    finally:
        GRACEFUL.requested = False
    capsys.readouterr()
    run = the_run(tiny_gsm8k["db"])
    assert run.status == "interrupted" and "--resume" in run.error
    request = run.config["request"]
    assert (request["warmup_ratio"], request["trace"]) == (0.5, True)
    assert isinstance(seen[-1], new) and seen[-1].warmup_ratio == 0.5

    # the config hash: the identity option is in it, the provenance one is not
    objective = get_objective(run.objective, **run.params)
    plain = C.from_dict({k: v for k, v in request.items() if k not in ("warmup_ratio", "trace")}, "plain")
    assert run.config_hash == C.run_key(dataclasses.replace(plain, warmup_ratio=0.5), objective, run.suite_version)
    assert run.config_hash != C.run_key(dataclasses.replace(plain, trace=True), objective, run.suite_version)
    assert C.run_key(plain, objective, run.suite_version) == \
        C.run_key(base(**{k: v for k, v in request.items() if k not in ("warmup_ratio", "trace")}), objective,
                  run.suite_version)

    assert main(["run", "--resume", str(run.id), "--db", str(tiny_gsm8k["db"]), "--no-progress"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    resumed = seen[-1]
    assert isinstance(resumed, new) and (resumed.warmup_ratio, resumed.trace) == (0.5, True)
    assert (resumed.db, resumed.progress) == (str(tiny_gsm8k["db"]), False)  # the resuming command's
    done = the_run(tiny_gsm8k["db"])
    assert done.id == run.id and done.status == "finished"
    assert (done.config["request"]["warmup_ratio"], done.config["request"]["trace"]) == (0.5, True)
    assert done.config_hash == run.config_hash
