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


# ---------------------------------------------------------------------------- kdbench leaderboard


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leaderboard(argv, monkeypatch, capsys):
    """`kdbench leaderboard ...` in this process, the streamlit command it would exec captured instead."""
    from kdbench.cli import main

    execs = []
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: execs.append((path, cmd, env)))
    rc = main(["leaderboard", *argv])
    out, err = capsys.readouterr()
    assert rc == 0 and len(execs) == 1, err
    return execs[0][1], execs[0][2], out


def _flag(cmd: list, name: str) -> str:
    assert cmd.count(name) == 1, cmd
    return cmd[cmd.index(name) + 1]


def test_leaderboard_serves_this_machine_only_and_sends_no_usage_statistics(store, monkeypatch, capsys):
    port = _free_port()
    cmd, _, out = _leaderboard(["--db", str(store), "--port", str(port)], monkeypatch, capsys)
    assert _flag(cmd, "--server.address") == "127.0.0.1" and _flag(cmd, "--server.port") == str(port)
    assert _flag(cmd, "--browser.gatherUsageStats") == "false" and _flag(cmd, "--server.headless") == "true"
    assert cmd[cmd.index("--") + 1:] == ["--db", f"sqlite:///{store}"]
    assert "--server.enableCORS" not in cmd and "--server.enableXsrfProtection" not in cmd  # streamlit's: on
    assert "sharing" not in out


def test_leaderboard_shares_only_the_address_asked_for_and_says_what_that_exposes(store, monkeypatch, capsys):
    port = _free_port()
    cmd, _, out = _leaderboard(["--db", str(store), "--port", str(port), "--address", "0.0.0.0"], monkeypatch, capsys)
    assert _flag(cmd, "--server.address") == "0.0.0.0" and _flag(cmd, "--browser.gatherUsageStats") == "false"
    assert f"sharing the store on 0.0.0.0:{port}" in out and "without authentication" in out
    cmd, _, _ = _leaderboard(["--db", str(store), "--port", str(port), "--address", "localhost"], monkeypatch, capsys)
    assert _flag(cmd, "--server.address") == "localhost"


@pytest.mark.parametrize("url", ["postgresql://kd:s3cret-pw@127.0.0.1:5432/runs",
                                 "postgresql://kd:s3cret@pw@127.0.0.1:5432/runs",
                                 "postgresql://kd@127.0.0.1:5432/runs?password=s3cret-pw",
                                 "postgresql://kd@127.0.0.1/runs?sslmode=require&sslpassword=s3cret-pw"])
def test_leaderboard_never_puts_a_store_password_on_the_command_line(url, monkeypatch, capsys):
    import kdbench.store

    class Engine:
        def dispose(self):
            pass

    monkeypatch.setattr(kdbench.store, "open_engine", lambda db, readonly=False: Engine())  # no server here
    monkeypatch.setattr(kdbench.store, "require_schema", lambda engine: engine)
    cmd, env, out = _leaderboard(["--db", url, "--port", str(_free_port())], monkeypatch, capsys)
    assert not any("s3cret" in part for part in cmd) and "s3cret" not in out
    assert env["KDBENCH_DB"] == url and "--db" not in cmd


def test_leaderboard_refuses_a_missing_store_before_streamlit_starts(tmp_path):
    res = kdbench("leaderboard", "--db", str(tmp_path / "missing.db"), "--port", str(_free_port()))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no run store at" in res.stderr, res.stderr
    assert "streamlit" not in res.stdout and not (tmp_path / "missing.db").exists()


def test_leaderboard_app_config_beside_the_app_keeps_streamlit_local_and_quiet():
    """`streamlit run leaderboard_app/app.py` from any folder reads leaderboard_app/.streamlit/config.toml."""
    options = ("browser.gatherUsageStats", "server.address", "server.headless", "server.enableCORS",
               "server.enableXsrfProtection")
    code = ("import sys; from streamlit import config; config._main_script_path = sys.argv[1];"  # as `streamlit run`
            "config.get_config_options(force_reparse=True); print(*[config.get_option(o) for o in sys.argv[2:]])")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "leaderboard_app" / "app.py"), *options],
                         capture_output=True, text=True, cwd="/", timeout=120,
                         env={**os.environ, "HOME": "/nonexistent-kdbench-home"})
    assert res.returncode == 0 and res.stdout.split() == ["False", "127.0.0.1", "True", "True", "True"], res.stderr


# ---------------------------------------------------------------------------- kdbench cache

KEYS = ("3fa2c9d41b7e05a86c1d92e4", "3fa27b10c4d8e9f2a3b5c6d7")


def _cache(root: Path) -> tuple[Path, Path]:
    """A teacher-cache entry and a prompt-cache entry, as the caches publish them (files that list)."""
    import json

    t, p = root / "teacher-hidden" / KEYS[0], root / "teacher-prompts" / KEYS[1]
    t.mkdir(parents=True)
    (t / "hidden.bin").write_bytes(bytes(32))
    (t / "index.json").write_text(json.dumps({"ex0": [0, 2, "0" * 16]}))
    (t / "meta.json").write_text(json.dumps({"key": KEYS[0], "format": 2, "dtype": "float32", "n_rows": 2, "d": 4,
                                             "n_examples": 1, "inputs": {"teacher": {"weights": "w" * 64}}}))
    p.mkdir(parents=True)
    (p / "prefix.pt").write_bytes(bytes(64))
    (p / "meta.json").write_text(json.dumps({"key": KEYS[1], "format": 1, "batches": 1,
                                             "inputs": {"dtype": "float32"}}))
    for e in (t, p):
        (e / "last_used").touch()
        os.utime(e / "last_used", (1_000_000, 1_000_000))
    return t, p


def _tree(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.is_dir()) for p in sorted(root.rglob("*"))}


def test_cache_list_writes_nothing(tmp_path, monkeypatch, capsys):
    from kdbench.cli import main

    missing = tmp_path / "not-yet" / "cache"
    monkeypatch.setenv("KDBENCH_CACHE", str(missing))
    assert main(["cache", "list"]) == 0 and "0 entries" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no cache folder made by looking
    root = tmp_path / "cache"
    _cache(root)
    monkeypatch.setenv("KDBENCH_CACHE", str(root))
    before = _tree(root)
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert KEYS[0] in out and KEYS[1] in out and "1970-01-12" in out  # the runs' "last used", as stamped
    assert _tree(root) == before  # no folder, lock or stamp


def test_cache_clear_takes_keys_or_all_never_nothing_or_an_empty_key(tmp_path, monkeypatch, capsys):
    from kdbench.cli import main

    root = tmp_path / "cache"
    t, p = _cache(root)
    monkeypatch.setenv("KDBENCH_CACHE", str(root))
    for argv, message in ((["cache", "clear"], "or --all for every entry"),
                          (["cache", "clear", ""], "KEY must not be empty"),
                          (["cache", "clear", "3fa2"], "matches 2 entries"),
                          (["cache", "clear", "--all", KEYS[0]], "not both")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert t.is_dir() and p.is_dir(), argv
    assert main(["cache", "clear", KEYS[1][:6]]) == 0  # a prefix that names one entry
    assert f"removed {KEYS[1]}" in capsys.readouterr().out and not p.exists() and t.is_dir()
    _cache(tmp_path / "again")
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "again"))
    assert main(["cache", "clear", "--all"]) == 0
    out = capsys.readouterr().out
    assert KEYS[0] in out and KEYS[1] in out
    assert [p for p in (tmp_path / "again").rglob("*") if p.is_file() or p.name.startswith(".")] == []


def test_a_damaged_entry_is_listed_and_clearable_not_a_traceback(tmp_path, monkeypatch, capsys):
    from kdbench.cli import main

    t, _ = _cache(tmp_path / "cache")
    (t / "hidden.bin").unlink()
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    assert main(["cache", "list"]) == 0
    assert "damaged" in capsys.readouterr().out
    assert main(["cache", "clear", KEYS[0]]) == 0 and not t.exists()


def test_cache_home_looks_up_and_cache_dir_creates(tmp_path, monkeypatch):
    from kdbench.errors import UserError
    from kdbench.diskcache import cache_dir, cache_home

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "a" / "b"))
    assert cache_home() == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    assert cache_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    for bad in ("", str(tmp_path / "file"), str(tmp_path / "file" / "sub"), "/proc/kdbench-cache"):
        monkeypatch.setenv("KDBENCH_CACHE", bad)
        for lookup in (cache_home, cache_dir):
            with pytest.raises(UserError):
                lookup()
