"""Bad input: one clear line on stderr, exit code 2, no traceback, and the store untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.store import ROLE_DISTILLED, RunWriter, open_engine


ROOT = Path(__file__).resolve().parents[1]


def kdbench(*args, cwd=None, env=None):
    # this checkout first on the path (a worktree must not run another checkout's installed kdbench)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.fixture()
def store(tmp_path):
    db = tmp_path / "runs.db"
    w = RunWriter.start(open_engine(str(db)), role=ROLE_DISTILLED, suite="micro", suite_version="1", seed=0,
                        config={}, provenance={}, objective="kl", params={}, setting="kl()")
    w.metrics([("chatterbot", "rougeL", 12.5, 10)])
    w.finish()
    open_engine(str(db)).dispose()
    return db


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("args, expected", [
    (["run", "--objective", "csdd"], "unknown objective 'csdd'"),
    (["run", "--objective", "csd", "--param", "tau"], "malformed --param 'tau'"),
    (["run", "--objective", "csd", "--param", "tauu=1.5"], "tauu"),
    (["run", "--objective", "csd", "--param", "w1=X"], "w1"),
    (["run", "--objective", "csd", "--suite", "mikro"], "unknown suite 'mikro'"),
    (["run", "--objective", "csd", "--steps", "0"], "--steps must be at least 1"),
    (["run"], "--objective"),
    (["show", "999"], "no run 999"),
])
def test_bad_input_is_one_line_exit_2_and_store_untouched(store, args, expected):
    before = digest(store)
    res = kdbench(*args, "--db", str(store)) if args[0] in ("run", "show") and len(args) > 1 else kdbench(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdbench: error:") and expected in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert digest(store) == before


def test_unknown_objective_suggests_closest_first(store):
    res = kdbench("run", "--objective", "csdd", "--db", str(store))
    msg = res.stderr.strip()
    assert "valid choices: csd," in msg  # closest match first


@pytest.mark.parametrize("db", ["/nonexistent-dir/runs.db", "/etc/passwd/runs.db"])
def test_unwritable_store_is_a_one_line_error(db):
    res = kdbench("run", "--objective", "csd", "--db", db)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "cannot" in res.stderr
    assert "Traceback" not in res.stderr


def test_show_on_missing_store(tmp_path):
    res = kdbench("show", "1", "--db", str(tmp_path / "none.db"))
    assert res.returncode == 2 and "no run store" in res.stderr
    assert not (tmp_path / "none.db").exists()


def test_list_shows_objectives_and_suites():
    res = kdbench("list")
    assert res.returncode == 0
    for name in ("csd", "kl", "rkl", "dld", "csd_ts", "micro"):
        assert name in res.stdout


def test_a_broken_plugin_is_one_warning_and_the_others_still_work(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text("def oops(:\n")
    (plugins / "fine.py").write_text(
        "from kdbench.registry import objective\n\n"
        "@objective('fineplug', behaviour='balanced', paper='-')\n"
        "def fineplug(s, t):\n    \"\"\"A fine plug-in.\"\"\"\n    return (s - t).pow(2).mean(-1)\n")
    env = {"KDBENCH_PLUGIN_PATH": str(plugins)}
    res = kdbench("list", env=env)
    assert res.returncode == 0 and "fineplug" in res.stdout and "csd" in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdbench: warning:") and "broken.py" in lines[0], res.stderr
    assert "SyntaxError" in lines[0] and "Traceback" not in res.stderr
    # a run of another objective resolves it (and stops later, at the unknown suite): warning + error
    res = kdbench("run", "--objective", "csd", "--suite", "mikro", "--db", str(tmp_path / "x.db"), env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 2 and "broken.py" in lines[0] and "unknown suite 'mikro'" in lines[1]
    # asking for the broken one: one line naming the file and the failure
    res = kdbench("run", "--objective", "broken", "--db", str(tmp_path / "x.db"), env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "broken.py" in res.stderr
    assert "SyntaxError" in res.stderr and not (tmp_path / "x.db").exists()


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    """`kdbench list | head -1`: the pipe closes before kdbench writes; no traceback, exit 141."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    proc.stdout.close()  # before kdbench has written a byte
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
