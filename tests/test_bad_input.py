"""The bad-input corpus: every mistake a user can make at the command line is one clear line on
stderr (``kdbench: error: ...``), exit code 2, no traceback, and nothing created or changed.

Each case runs the real CLI entry point, ``kdbench.cli.main([...])``, in this process (fresh
objective registry, environment and working directory per case; stderr captured); a
representative subset also runs as a real ``python -m kdbench`` process. Cases that need a
model use the tiny random Llama pair of tests/tiny_models.py; data cases point ``--data-dir``
at small folders in the layout of ../shared/data with one fault each. After every case the
stores' bytes and row counts are compared with what they were, and no file may have appeared.
That world is built once per module by tests/bad_input_world.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from kdbench import plugins, registry
from kdbench.cli import main

try:
    from tests.bad_input_world import ENV, fill, snapshot, world  # noqa: F401  (world: a fixture)
except ImportError:  # run from inside tests/
    from bad_input_world import ENV, fill, snapshot, world  # noqa: F401


# ---------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    id: str
    args: list
    expect: str                       # a substring of the error line
    env: dict = field(default_factory=dict)
    subprocess: bool = False          # also run as a real process
    xfail: str | None = None          # "ENGINE: <the change needed>"
    never: tuple = ()                 # secrets that must not appear in anything the command prints
    gpus: int | None = None           # CUDA devices this process sees (torch.cuda monkeypatched; None: as it is)


def tiny(world_suite: str, data: str, *extra: str, student: str = "{student}") -> list:
    return ["run", "--objective", "csd", "--suite", world_suite, "--teacher", "{teacher}", "--teacher-finetuned",
            "--student", student, "--data-dir", "{data}/" + data, "--steps", "1", "--eval-limit", "1",
            "--no-save", "--no-progress", "--db", "{good}", *extra]


RUN = ["run", "--objective"]
G = ["--db", "{good}"]

try:
    from tests.bad_input_world import tiny_run_flags
except ImportError:  # run from inside tests/
    from bad_input_world import tiny_run_flags


def contract(name: str) -> list:
    """A tiny run of objective ``name`` of {plugins}/contract.py, which breaks the objective contract
    when called: refused before anything is loaded, on a store that already holds the reference rows
    of this configuration (so "nothing written" covers every row); ``contract-*-new-store`` cases
    show that a store without them gets none either."""
    return ["run", "--objective", f"{{plugins}}/contract.py:{name}",
            *tiny_run_flags("{teacher}", "{student}", "{data}/gsm_train24"), "--db", "{prepared}"]


def sweep_file(name: str) -> list:
    return ["sweep", f"{{sweeps}}/{name}.yaml", "--dry-run", *G]

CASES = [
    # ---- objective names and parameters
    Case("objective-typo", RUN + ["csdd", *G], "unknown objective 'csdd' (did you mean 'csd'?)"),
    Case("objective-case", RUN + ["KL", *G], "did you mean 'kl'?"),
    Case("objective-case-alias", RUN + ["CSD_TS", *G], "did you mean 'csd_ts'?"),
    Case("objective-empty", RUN + ["", *G], "unknown objective ''"),
    Case("objective-setting-unclosed", RUN + ["csd(tau", *G], "cannot read objective setting"),
    Case("objective-setting-no-value", RUN + ["csd(tau=)", *G], "expects a float"),
    Case("objective-setting-twice", RUN + ["csd(tau=1.5)", "--param", "tau=2", *G], "given both"),
    Case("objective-py-without-name", RUN + ["{plugins}/good.py", *G], "to use an objective from a file, name it"),
    Case("param-no-equals", RUN + ["csd", "--param", "tau", *G], "malformed --param 'tau'"),
    Case("param-no-key", RUN + ["csd", "--param", "=1.5", *G], "malformed --param '=1.5'"),
    Case("param-no-value", RUN + ["csd", "--param", "tau=", *G], "malformed --param 'tau='"),
    Case("param-bad-key", RUN + ["csd", "--param", "1tau=2", *G], "is not a parameter name"),
    Case("param-duplicate", RUN + ["csd", "--param", "tau=1", "--param", "tau=2", *G], "--param 'tau' given twice"),
    Case("param-unknown", RUN + ["csd", "--param", "tauu=1.5", *G], "tauu"),
    Case("param-wrong-type", RUN + ["csd", "--param", "tau=hot", *G], "expects a float"),
    Case("param-zero", RUN + ["csd", "--param", "tau=0", *G], "must be in [0.05, 100.0]"),
    Case("param-negative", RUN + ["csd", "--param", "tau=-1", *G], "must be in [0.05, 100.0]"),
    Case("param-nan", RUN + ["csd", "--param", "tau=nan", *G], "finite"),
    Case("param-inf", RUN + ["csd", "--param", "tau=inf", *G], "finite"),
    Case("param-overflow", RUN + ["csd", "--param", "tau=1e400", *G], "finite"),
    Case("param-bad-choice", RUN + ["csd", "--param", "w1=X", *G], "w1"),
    Case("param-choice-typo", RUN + ["dld", "--param", "norm=meen", *G], "mean"),
    Case("param-out-of-range", RUN + ["jsd", "--param", "beta=1.5", *G], "must be in {0.0} ∪ [1e-30, 1.0]"),
    Case("param-not-taken", RUN + ["kl", "--param", "tau=2", *G], "takes no parameters"),
    Case("param-alias-conflict", RUN + ["csd_ts", "--param", "w1=S", *G], "fixes w1=T"),
    # ---- numbers
    Case("seed-negative", RUN + ["csd", "--seed", "-1", *G], "--seed must be at least 0", subprocess=True),
    Case("seed-1e23", RUN + ["csd", "--seed", str(10**23), *G], "--seed must be in [0, 4294967295]"),
    Case("seed-2-63", RUN + ["csd", "--seed", str(2**63), *G], "--seed must be in [0, 4294967295]"),
    Case("seed-2-32", RUN + ["csd", "--seed", str(2**32), *G], "--seed must be in [0, 4294967295]"),
    Case("seed-float", RUN + ["csd", "--seed", "1.5", *G], "--seed must be an integer"),
    Case("seed-word", RUN + ["csd", "--seed", "abc", *G], "--seed must be an integer"),
    Case("steps-zero", RUN + ["csd", "--steps", "0", *G], "--steps must be at least 1"),
    Case("steps-negative", RUN + ["csd", "--steps", "-3", *G], "--steps must be at least 1"),
    Case("steps-huge", RUN + ["csd", "--steps", str(10**12), *G], "--steps must be at most"),
    Case("steps-word", RUN + ["csd", "--steps", "many", *G], "--steps must be an integer"),
    Case("eval-limit-zero", RUN + ["csd", "--eval-limit", "0", *G], "--eval-limit must be at least 1"),
    Case("analyze-batches-zero", ["analyze", "--batches", "0", *G], "--batches must be at least 1"),
    Case("analyze-seed-negative", ["analyze", "--seed", "-2", *G], "--seed must be at least 0"),
    Case("analyze-bad-objective", ["analyze", "--objectives", "kl", "nope", *G], "unknown objective 'nope'"),
    Case("analyze-finetune-zero", ["analyze", "--finetune-steps", "0", *G], "--finetune-steps must be at least 1"),
    Case("leaderboard-port-zero", ["leaderboard", "--port", "0", *G], "--port must be in [1, 65535]"),
    Case("leaderboard-port-huge", ["leaderboard", "--port", "70000", *G], "--port must be at most 65535"),
    Case("gc-stale-digit-separator", ["gc", "--stale-after", "1_0", *G], "--stale-after must be a number of seconds"),
    Case("gc-stale-negative", ["gc", "--stale-after", "-5", *G], "--stale-after must be a positive"),
    Case("gc-mark-and-delete", ["gc", "--mark", "--delete", *G], "not allowed with"),
    # ---- suites, pairs, devices, models
    Case("suite-typo", RUN + ["csd", "--suite", "mikro", *G], "unknown suite 'mikro'"),
    Case("suite-empty", RUN + ["csd", "--suite", "", *G], "unknown suite ''"),
    Case("pair-unknown", RUN + ["csd", "--pair", "nope", *G], "unknown pair for suite micro 'nope'"),
    Case("device-unknown", RUN + ["csd", "--device", "tpu", *G], "unknown device 'tpu'"),
    Case("device-malformed", RUN + ["csd", "--device", "cuda:x", *G], "unknown device 'cuda:x'"),
    Case("device-auto-typo", RUN + ["csd", "--device", "autp", *G], "valid choices: auto, cpu, cuda, cuda:N"),
    Case("device-cuda-absent", RUN + ["csd", "--device", "cuda", *G], "device 'cuda' requested but no CUDA device",
         gpus=0, env={"CUDA_VISIBLE_DEVICES": ""}, subprocess=True),
    Case("device-cuda-absent-new-store", RUN + ["csd", "--device", "cuda:0", "--db", "{stores}/new.db"],
         "device 'cuda:0' requested but no CUDA device", gpus=0),
    Case("device-cuda-index-beyond", RUN + ["csd", "--device", "cuda:7", *G],
         "device 'cuda:7' requested but only 2 CUDA device(s) are visible (cuda:0 to cuda:1)", gpus=2),
    Case("prepare-device-cuda-absent", ["prepare", "--device", "cuda", *G], "no CUDA device", gpus=0),
    Case("sweep-device-cuda-beyond", ["sweep", "--objectives", "kl", "--device", "cuda:3", *G],
         "device 'cuda:3' requested but only 1 CUDA device(s) are visible (cuda:0)", gpus=1),
    Case("analyze-device-cuda-absent", ["analyze", "--device", "cuda", "--db", "{stores}/new.db"],
         "no CUDA device", gpus=0),
    Case("analyze-device-unknown", ["analyze", "--device", "gpu", *G], "unknown device 'gpu'"),
    Case("eval-device-unknown", ["eval", "1", "--lm-eval", "x", "--device", "tpu", *G], "unknown device 'tpu'"),
    # --deterministic where it cannot be honoured
    Case("deterministic-cublas-config", RUN + ["csd", "--device", "cuda", "--deterministic", *G],
         "--deterministic cannot be honoured with CUBLAS_WORKSPACE_CONFIG=':0:0'", gpus=1,
         env={"CUBLAS_WORKSPACE_CONFIG": ":0:0"}),
    Case("deterministic-nondeterministic-op", contract("nondet") + ["--deterministic"],
         "--deterministic cannot be honoured on cpu: put_ has no deterministic implementation there (the start-up "
         "check)"),
    Case("data-dir-on-embedded-suite", RUN + ["csd", "--data-dir", "{data}/ok", *G], "has embedded data"),
    Case("teacher-finetuned-alone", RUN + ["csd", "--teacher-finetuned", *G], "--teacher-finetuned needs --teacher"),
    Case("teacher-missing-folder", RUN + ["csd", "--teacher", "/nonexistent/teacher", *G], "no such model folder"),
    Case("student-missing-folder", RUN + ["csd", "--student", "./no-such-student", *G], "no such model folder"),
    # ---- the command line itself
    Case("no-command", [], "the following arguments are required: command"),
    Case("unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("run-without-objective", ["run", *G], "--objective"),
    # ---- samplers (kdbench/engine/samplers.py)
    Case("sampler-unknown", RUN + ["kl", "--sampler", "gdk", *G], "unknown sampler 'gdk' (did you mean 'gkd'?)"),
    Case("sampler-lambda-above-1", RUN + ["kl", "--sampler", "gkd(lmbda=1.5)", *G], "lmbda must be in [0, 1]"),
    Case("sampler-lambda-negative", RUN + ["kl", "--sampler", "gkd(lmbda=-1)", *G], "lmbda must be in [0, 1]"),
    Case("sampler-param-of-another", RUN + ["kl", "--sampler", "imitkd(lmbda=0.5)", *G], "(it is gkd's)"),
    Case("sampler-without-teacher", RUN + ["ce", "--sampler", "imitkd", *G], "objective ce uses no teacher"),
    Case("seqkd-without-teacher", RUN + ["ce", "--sampler", "seqkd", *G],
         "sampler seqkd(greedy=1) trains on the teacher's generated responses, scored by the teacher; objective ce "
         "uses no teacher"),
    Case("sampler-param-not-whole", RUN + ["kl", "--sampler", "distillm(capacity=2.5)", *G],
         "capacity must be a whole number, got 2.5"),
    Case("unknown-flag", RUN + ["csd", "--bogus", *G], "unrecognized arguments: --bogus"),
    Case("db-empty-string", ["show", "1", "--db", ""], "--db must not be empty"),
    Case("show-id-word", ["show", "abc", *G], "run_id must be an integer"),
    Case("show-id-zero", ["show", "0", *G], "run_id must be at least 1"),
    Case("show-id-negative", ["show", "-5", *G], "run_id must be at least 1"),
    Case("show-id-2-63", ["show", str(2**63), *G], "run_id must be at most 9223372036854775807"),
    Case("show-id-huge", ["show", str(10**30), *G], "run_id must be at most"),
    Case("show-id-absent", ["show", "999", *G], "no run 999 in the store"),
    Case("eval-limit-zero-eval", ["eval", "1", "--lm-eval", "x", "--limit", "0", *G], "--limit must be at least 1"),
    Case("eval-absent-run", ["eval", "999", "--lm-eval", "x", *G], "no run 999 in the store"),
    Case("eval-no-saved-student", ["eval", "1", "--lm-eval", "x", *G], "has no saved student"),
    # ---- stores
    Case("show-missing-store", ["show", "1", "--db", "{stores}/missing.db"], "no run store at"),
    Case("show-missing-store-url", ["show", "1", "--db", "sqlite:///{stores}/missing.db"], "no run store at"),
    Case("show-missing-store-pysqlite", ["show", "1", "--db", "sqlite+pysqlite:///{stores}/missing.db?timeout=3"],
         "no run store at"),
    Case("show-missing-store-env", ["show", "1"], "no run store at", env={"KDBENCH_DB": "{stores}/from_env.db"}),
    Case("eval-missing-store", ["eval", "1", "--lm-eval", "x", "--db", "{stores}/MISSING.db"], "no run store at",
         subprocess=True),
    Case("gc-missing-store", ["gc", "--mark", "--db", "{stores}/missing.db"], "no run store at"),
    Case("show-directory", ["show", "1", "--db", "{stores}/dir.db"], "is a directory"),
    Case("run-directory", RUN + ["kl", "--db", "{stores}/dir.db"], "is a directory"),
    Case("show-corrupt", ["show", "1", "--db", "{stores}/corrupt.db"], "is not a SQLite database", subprocess=True),
    Case("show-corrupt-pysqlite", ["show", "1", "--db", "sqlite+pysqlite:///{stores}/corrupt.db"],
         "is not a SQLite database"),
    Case("run-corrupt", RUN + ["kl", "--db", "{stores}/corrupt.db"], "is not a SQLite database"),
    Case("gc-text-file", ["gc", "--db", "{stores}/textfile.db"], "is not a SQLite database"),
    Case("show-truncated", ["show", "1", "--db", "{stores}/truncated.db"], "is truncated"),
    Case("run-truncated", RUN + ["kl", "--db", "{stores}/truncated.db"], "is truncated"),
    Case("show-header-only", ["show", "1", "--db", "{stores}/header_only.db"], "truncated"),
    Case("show-empty-file", ["show", "1", "--db", "{stores}/empty.db"], "is empty (no kdbench tables)"),
    Case("eval-empty-file", ["eval", "1", "--lm-eval", "x", "--db", "{stores}/empty.db"], "is empty"),
    Case("show-foreign", ["show", "1", "--db", "{stores}/foreign.db"], "is not a kdbench run store"),
    Case("run-foreign", RUN + ["kl", "--db", "{stores}/foreign.db"], "is not a kdbench run store"),
    Case("gc-delete-foreign", ["gc", "--delete", "--yes", "--db", "{stores}/foreign.db"], "is not a kdbench run store"),
    Case("run-runs-without-version", RUN + ["kl", "--db", "{stores}/runs_no_version.db"], "has no schema_version"),
    Case("show-newer", ["show", "1", "--db", "{stores}/newer.db"],
         "has schema 999; this kdbench reads schema 2 — upgrade kdbench"),
    Case("run-newer", RUN + ["kl", "--db", "{stores}/newer.db"], "has schema 999", subprocess=True),
    Case("eval-newer", ["eval", "1", "--lm-eval", "x", "--db", "{stores}/newer.db"], "has schema 999"),
    Case("analyze-newer", ["analyze", "--db", "{stores}/newer.db"], "has schema 999"),
    Case("gc-newer", ["gc", "--mark", "--db", "sqlite:///{stores}/newer.db"], "has schema 999"),
    Case("run-bad-version", RUN + ["kl", "--db", "{stores}/bad_version.db"], "unreadable schema_version"),
    Case("show-damaged-column", ["show", "1", "--db", "{stores}/damaged.db"], "table runs has no column(s) pid"),
    Case("run-damaged-table", RUN + ["kl", "--db", "{stores}/no_curves.db"], "table curves is missing"),
    Case("run-no-such-dir", RUN + ["kl", "--db", "/nonexistent-kdbench-dir/runs.db"], "does not exist"),
    Case("run-parent-is-file", RUN + ["kl", "--db", "{stores}/empty.db/runs.db"], "is not a directory"),
    Case("run-unwritable-dir", RUN + ["kl", "--db", "/proc/kdbench-runs.db"], "cannot write run store"),
    Case("run-bad-url", RUN + ["kl", "--db", "nonsense://somewhere"], "cannot open run store"),
    Case("run-bad-sqlite-driver", RUN + ["kl", "--db", "sqlite+nosuchdriver:///{stores}/x.db"], "is not supported"),
    Case("run-missing-driver", RUN + ["kl", "--db", "postgresql://user@127.0.0.1:1/kdbench"], "run store"),
    # ---- stores no result could survive in, stores that must not be created, secrets in store URLs
    Case("run-in-memory", RUN + ["kl", "--db", "sqlite://"], "is in memory: every result would be lost"),
    Case("run-in-memory-named", RUN + ["kl", "--db", "sqlite:///:memory:"], "is in memory", subprocess=True),
    Case("run-in-memory-uri", RUN + ["kl", "--db", "sqlite:///file:kd?mode=memory&uri=true"], "is in memory"),
    Case("run-in-memory-env", RUN + ["kl"], "is in memory", env={"KDBENCH_DB": "sqlite://"}),
    Case("prepare-in-memory", ["prepare", "--db", "sqlite://"], "is in memory"),
    Case("sweep-in-memory", ["sweep", "--objectives", "kl", "--db", "sqlite://"], "is in memory"),
    Case("analyze-in-memory", ["analyze", "--db", "sqlite://"], "is in memory"),
    Case("gc-in-memory", ["gc", "--mark", "--db", "sqlite://"], "cannot be opened read-only"),
    Case("resume-missing-store", ["run", "--resume", "1", "--db", "{stores}/typo.db"], "no run store at",
         subprocess=True),
    Case("resume-missing-store-url", ["run", "--resume", "1", "--db", "sqlite:///{stores}/typo2.db"], "no run store at"),
    Case("resume-in-memory", ["run", "--resume", "1", "--db", "sqlite://"], "cannot be opened read-only"),
    Case("resume-empty-store", ["run", "--resume", "1", "--db", "{stores}/empty.db"], "is empty"),
    Case("resume-foreign-store", ["run", "--resume", "1", "--db", "{stores}/foreign.db"], "is not a kdbench run store"),
    Case("resume-newer-store", ["run", "--resume", "1", "--db", "{stores}/newer.db"], "has schema 999"),
    Case("resume-absent-run", ["run", "--resume", "77", *G], "no run 77 in the store"),
    Case("resume-not-a-distillation", ["run", "--resume", "1", *G], "is not a distillation run"),
    Case("connect-timeout-word", ["show", "1", "--db", "postgresql+psycopg://u@127.0.0.1:1/kd"],
         "KDBENCH_DB_CONNECT_TIMEOUT must be a whole number", env={"KDBENCH_DB_CONNECT_TIMEOUT": "soon"}),
    Case("connect-timeout-zero", ["show", "1", "--db", "postgresql+psycopg://u@127.0.0.1:1/kd"],
         "KDBENCH_DB_CONNECT_TIMEOUT must be a whole number", env={"KDBENCH_DB_CONNECT_TIMEOUT": "0"}),
    Case("password-closed-port", ["show", "1", "--db", "postgresql+psycopg://ana:S3cr3t-Pw@127.0.0.1:1/kd"],
         "postgresql+psycopg://ana:***@127.0.0.1:1/kd", never=("S3cr3t-Pw",)),
    Case("password-raw-at", RUN + ["kl", "--db", "postgresql+psycopg://ana:S3cr3t-Pw@x@127.0.0.1:1/kd"],
         "ana:***@127.0.0.1:1/kd", never=("S3cr3t-Pw", "@x@")),
    Case("password-query", ["gc", "--db", "postgresql+psycopg://ana@127.0.0.1:1/kd?password=S3cr3t-Pw&sslmode=disable"],
         "password=***", never=("S3cr3t-Pw",)),
    Case("password-sslpassword", ["show", "1", "--db", "postgresql+psycopg://ana@127.0.0.1:1/kd?sslpassword=S3cr3t-Pw"],
         "sslpassword=***", never=("S3cr3t-Pw",)),
    Case("password-env", ["show", "1"], "ana:***@", env={"KDBENCH_DB": "postgresql+psycopg://ana:S3cr3t-Pw@127.0.0.1:1/kd"},
         never=("S3cr3t-Pw",)),
    Case("password-bad-scheme", RUN + ["kl", "--db", "nonsense+x://ana:S3cr3t-Pw@somewhere/kd"], "cannot open run store",
         never=("S3cr3t-Pw",)),
    Case("password-unparsable", RUN + ["kl", "--db", "postgresql://ana:S3cr3t-Pw@127.0.0.1:notaport/kd"], "run store",
         never=("S3cr3t-Pw",)),
    Case("password-resume", ["run", "--resume", "1", "--db", "postgresql+psycopg://ana:S3cr3t-Pw@127.0.0.1:1/kd"], "run store",
         never=("S3cr3t-Pw",)),
    # ---- caches and the leaderboard
    # the world's cache ({root}/cache, tests/bad_input_world.py) holds teacher-cache entry 3fa2c9d41b7e05a86c1d92e4
    # and prompt-cache entry 3fa27b10c4d8e9f2a3b5c6d7: a refused `cache clear` must leave both (and create nothing)
    Case("cache-clear-no-key", ["cache", "clear"], "or --all for every entry", env={"KDBENCH_CACHE": "{root}/cache"},
         subprocess=True),
    Case("cache-clear-empty-key", ["cache", "clear", ""], "KEY must not be empty",
         env={"KDBENCH_CACHE": "{root}/cache"}, subprocess=True),
    Case("cache-clear-blank-key", ["cache", "clear", "  "], "KEY must not be empty",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-empty-among-keys", ["cache", "clear", "3fa2c9", ""], "KEY must not be empty",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-star", ["cache", "clear", "*"], "'*' is not a cache key", env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-dotdot", ["cache", "clear", "../"], "'../' is not a cache key",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-path", ["cache", "clear", "3fa2c9d41b7e05a86c1d92e4/meta.json"], "is not a cache key",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-short-prefix", ["cache", "clear", "3f"], "KEY '3f' is too short",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-ambiguous-prefix", ["cache", "clear", "3fa2"], "'3fa2' matches 2 entries",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-keys-and-all", ["cache", "clear", "--all", "3fa2c9"], "KEYs or --all, not both",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-unknown", ["cache", "clear", "deadbeef"], "no cache entry matches 'deadbeef'",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-clear-one-unknown", ["cache", "clear", "3fa2c9", "deadbeef"], "no cache entry matches 'deadbeef'",
         env={"KDBENCH_CACHE": "{root}/cache"}),
    Case("cache-env-empty", ["cache", "list"], "$KDBENCH_CACHE is empty", env={"KDBENCH_CACHE": ""}),
    Case("cache-env-blank-clear", ["cache", "clear", "--all"], "$KDBENCH_CACHE is empty", env={"KDBENCH_CACHE": "  "}),
    Case("cache-env-is-file", ["cache", "list"], "is not a folder", env={"KDBENCH_CACHE": "{plugins}/good.py"},
         subprocess=True),
    Case("cache-env-is-file-clear", ["cache", "clear", "--all"], "is not a folder",
         env={"KDBENCH_CACHE": "{stores}/good.db"}),
    Case("cache-env-under-a-file", ["cache", "list"], "is not a folder",
         env={"KDBENCH_CACHE": "{plugins}/good.py/cache"}),
    Case("cache-env-in-proc", ["cache", "list"], "cannot create", env={"KDBENCH_CACHE": "/proc/kdbench-cache"}),
    Case("cache-env-dangling-link", ["cache", "list"], "is a broken symbolic link",
         env={"KDBENCH_CACHE": "{root}/cache_dangling"}),
    Case("cache-env-dangling-link-clear", ["cache", "clear", "--all"], "is a broken symbolic link",
         env={"KDBENCH_CACHE": "{root}/cache_dangling"}),
    Case("run-cache-is-file", RUN + ["kl", *G], "is not a folder", env={"KDBENCH_CACHE": "{plugins}/good.py"}),
    Case("prepare-cache-in-proc", ["prepare", *G], "cannot create", env={"KDBENCH_CACHE": "/proc/kdbench-cache"}),
    Case("leaderboard-missing-store", ["leaderboard", "--db", "{stores}/missing.db"], "no run store at",
         subprocess=True),
    Case("leaderboard-missing-store-env", ["leaderboard"], "no run store at",
         env={"KDBENCH_DB": "{stores}/from_env.db"}),
    Case("leaderboard-directory", ["leaderboard", "--db", "{stores}/dir.db"], "is a directory"),
    Case("leaderboard-corrupt", ["leaderboard", "--db", "{stores}/corrupt.db"], "is not a SQLite database"),
    Case("leaderboard-empty-file", ["leaderboard", "--db", "{stores}/empty.db"], "is empty (no kdbench tables)"),
    Case("leaderboard-foreign", ["leaderboard", "--db", "{stores}/foreign.db"], "is not a kdbench run store"),
    Case("leaderboard-newer", ["leaderboard", "--db", "{stores}/newer.db"], "has schema 999"),
    Case("leaderboard-address-words", ["leaderboard", "--address", "not an address", *G],
         "--address must be an IP address or a host name, got 'not an address'"),
    Case("leaderboard-address-empty", ["leaderboard", "--address", "", *G], "--address must not be empty"),
    Case("leaderboard-address-url", ["leaderboard", "--address", "http://0.0.0.0", *G], "--address must be an IP"),
    Case("leaderboard-address-with-port", ["leaderboard", "--address", "127.0.0.1:8501", *G],
         "--address must be an IP"),
    Case("leaderboard-address-not-here", ["leaderboard", "--address", "192.0.2.1", *G], "cannot serve on 192.0.2.1"),
    Case("leaderboard-port-word", ["leaderboard", "--port", "http", *G], "--port must be an integer, got 'http'"),
    Case("leaderboard-shared-missing-store", ["leaderboard", "--address", "0.0.0.0", "--db", "{stores}/missing.db"],
         "no run store at"),
    Case("leaderboard-address-bad-ipv6", ["leaderboard", "--address", "::g", *G], "--address must be an IP"),
    # ---- plug-ins
    Case("plugin-missing-file", RUN + ["{plugins}/missing.py:x", *G], "objective plugin file not found"),
    Case("plugin-is-directory", RUN + ["{plugins}/folder.py:x", *G], "is a directory"),
    Case("plugin-syntax-error", RUN + ["{plugins}/syntax.py:oops", *G], "SyntaxError", subprocess=True),
    Case("plugin-raises", RUN + ["{plugins}/raises.py:x", *G], "RuntimeError: plug-in exploded at import"),
    Case("plugin-import-error", RUN + ["{plugins}/importerr.py:x", *G], "ModuleNotFoundError"),
    Case("plugin-no-objective", RUN + ["{plugins}/noobj.py:x", *G], "declares no objective"),
    Case("plugin-duplicate-name", RUN + ["{plugins}/dup.py:kl", *G], "'kl' is declared twice"),
    Case("plugin-bad-declaration", RUN + ["{plugins}/badbehaviour.py:badbeh", *G], "behaviour"),
    Case("plugin-two-unnamed", RUN + ["{plugins}/two.py:", *G], "declares 2 objectives; name one"),
    Case("plugin-wrong-name", RUN + ["{plugins}/good.py:goodplu", *G], "did you mean 'goodplug'?"),
    Case("plugin-path-missing-run", RUN + ["csd", *G], "$KDBENCH_PLUGIN_PATH names '/nonexistent-kdbench-plugins'",
         env={"KDBENCH_PLUGIN_PATH": "/nonexistent-kdbench-plugins"}),
    Case("plugin-path-missing-list", ["list"], "which does not exist",
         env={"KDBENCH_PLUGIN_PATH": "/nonexistent-kdbench-plugins"}),
    Case("plugin-path-is-file", ["list"], "is not a directory", env={"KDBENCH_PLUGIN_PATH": "{plugins}/good.py"}),
    Case("plugin-path-broken-asked-for", RUN + ["syntaxobj", *G], "syntaxobj.py' failed to import: SyntaxError",
         env={"KDBENCH_PLUGIN_PATH": "{pdir}"}),
    Case("plugin-sys-exit-at-import", RUN + ["{plugins}/exit0.py:x", *G], "exit0.py' failed to import: it called sys.exit(0)",
         subprocess=True),
    Case("plugin-system-exit-message", RUN + ["{plugins}/exitmsg.py:x", *G], "it called sys.exit('plug-in wants out')"),
    Case("plugin-odd-getattr", RUN + ["{plugins}/oddattr.py:odd", *G], "oddattr.py' declares no objective"),
    Case("plugin-path-sys-exit-asked-for", RUN + ["exits", *G], "exits.py' failed to import: it called sys.exit(0)",
         env={"KDBENCH_PLUGIN_PATH": "{pexit}"}),
    Case("plugin-path-sys-exit-typo", RUN + ["exitz", *G], "plug-ins that failed to load: exits",
         env={"KDBENCH_PLUGIN_PATH": "{pexit}"}),
    # plug-ins that load but break the objective contract when called: refused before any model is loaded
    # (on 8 synthetic rows of 32 logits; the start-up check repeats it on the first real batch)
    Case("contract-wrong-signature", contract("nosig"), "contract.py) broke its contract: calling it as fn(s, t) on rows "
         "[8, 32] raised TypeError: nosig() takes 1 positional argument"),
    Case("contract-scalar-new-store", contract("scalar")[:-1] + ["{good}"], "broke its contract: its loss is a float32 "
         "tensor of shape ()"),
    Case("contract-detached-new-store", contract("detached")[:-1] + ["{good}"], "its loss does not depend on"),
    Case("contract-scalar", contract("scalar"), "contract.py) broke its contract: its loss is a float32 tensor of shape () "
         "where one value per position, shape (8,), was expected"),
    Case("contract-full-matrix", contract("full"), "its loss is a float32 tensor of shape (8, 32) where one value"),
    Case("contract-tuple-of-3", contract("triple"), "it returned a tuple of 3 items"),
    Case("contract-dict", contract("asdict"), "its loss is a dict where a tensor of shape (8,) was expected"),
    Case("contract-int-dtype", contract("intloss"), "its loss is an int64 tensor of shape (8,) where a floating-point"),
    Case("contract-detached", contract("detached"), "its loss does not depend on the student logits s"),
    Case("contract-sys-exit-when-called", contract("exits"), "contract.py) broke its contract: it called sys.exit(0) "
         "while computing its loss"),
    Case("contract-terms-list", contract("badterms"), "its terms are a list where a dict"),
    Case("contract-term-shape", contract("termshape"), "its term 'gap' is a float32 tensor of shape (8, 32)"),
    Case("contract-mutates-teacher-rows", contract("mutates"), "it modified its input t in place"),
    Case("contract-returns-none", contract("returnsnone"), "its loss is None where a tensor of shape (8,)"),
    Case("contract-raises", contract("raises"), "raised KeyError: 'vocab'"),
    Case("contract-gradient-shape", contract("badgrad"), "its gradient's grad is a float32 tensor of shape (8, 3)"),
    # ---- values and sweep specs: numbers read strictly, ranges that can train, sweeps checked whole
    Case("param-digit-separator", RUN + ["csd", "--param", "tau=1_5", *G], "'_' digit separators are not accepted"),
    Case("param-digit-separator-setting", RUN + ["csd(tau=1_5)", *G], "got '1_5': '_' digit separators"),
    Case("param-digit-separator-hinton", RUN + ["hinton", "--param", "tau=2_0", *G], "got '2_0'"),
    Case("steps-digit-separator", RUN + ["csd", "--steps", "1_0", *G], "--steps must be an integer, got '1_0'"),
    Case("seed-digit-separator", RUN + ["csd", "--seed", "1_0", *G], "--seed must be an integer, got '1_0'"),
    Case("lr-digit-separator", RUN + ["csd", "--lr", "1_0", *G], "--lr must be a number, got '1_0'"),
    Case("param-tau-denormal", RUN + ["csd", "--param", "tau=1e-320", *G], "must be in [0.05, 100.0], got '1e-320'"),
    Case("param-tau-below-range", RUN + ["csd", "--param", "tau=0.01", *G], "must be in [0.05, 100.0]"),
    Case("param-hinton-tau-huge", RUN + ["hinton", "--param", "tau=1e30", *G], "must be in [0.05, 100.0]"),
    Case("param-jsd-beta-tiny", RUN + ["jsd", "--param", "beta=1e-35", *G], "must be in {0.0} ∪ [1e-30, 1.0]"),
    Case("param-skl-alpha-one", RUN + ["skl", "--param", "alpha=1", *G], "must be in [0.0, 1.0), got '1'"),
    Case("param-srkl-alpha-one", RUN + ["srkl(alpha=1.0)", *G], "must be in [0.0, 1.0)"),
    Case("param-ab-alpha-huge", RUN + ["ab", "--param", "alpha=100", *G], "must be in [-1.0, 2.0]"),
    Case("param-ab-beta-negative", RUN + ["ab", "--param", "beta=-5", *G], "must be in [-1.0, 2.0]"),
    Case("sweep-tune-word", ["sweep", "--objectives", "kl", "--tune", "lr=abc", "--dry-run", *G],
         "--tune lr must be a number, got 'abc'"),
    Case("sweep-tune-separator", ["sweep", "--objectives", "kl", "--tune", "lr=1_0", "--dry-run", *G],
         "'_' digit separators"),
    Case("sweep-tune-negative", ["sweep", "--objectives", "kl", "--tune", "lr=-1e-4", "--dry-run", *G],
         "--tune lr must be a positive number"),
    Case("sweep-param-no-values", ["sweep", "--objectives", "csd", "--param", "tau=,", "--dry-run", *G],
         "malformed --param 'tau=,'"),
    Case("sweep-param-empty-value", ["sweep", "--objectives", "csd", "--param", "tau=1,,2", "--dry-run", *G],
         "malformed --param 'tau=1,,2'"),
    Case("sweep-param-twice", ["sweep", "--objectives", "csd", "--param", "tau=1", "--param", "tau=2", "--dry-run", *G],
         "--param 'tau' given twice"),
    Case("sweep-param-undeclared", ["sweep", "--objectives", "kl", "rkl", "--param", "tau=1", "--dry-run", *G],
         "--param tau: no objective of the sweep declares it"),
    Case("sweep-param-typo", ["sweep", "--objectives", "csd", "--param", "tauu=1", "--dry-run", *G],
         "did you mean 'tau'?"),
    Case("sweep-param-separator", ["sweep", "--objectives", "csd", "--param", "tau=1_5", "--dry-run", *G],
         "'_' digit separators"),
    Case("sweep-param-out-of-range", ["sweep", "--objectives", "csd", "--param", "tau=1,1e-320", "--dry-run", *G],
         "must be in [0.05, 100.0]"),
    Case("sweep-seeds-separator", ["sweep", "--objectives", "kl", "--seeds", "1_0", "--dry-run", *G],
         "--seeds must be an integer, got '1_0'"),
    Case("sweep-seeds-twice", ["sweep", "--objectives", "kl", "--seeds", "0", "0", "--dry-run", *G], "--seeds lists 0 twice"),
    Case("sweep-objectives-twice", ["sweep", "--objectives", "kl", "kl", "--dry-run", *G], "--objectives lists 'kl' twice"),
    Case("sweep-steps-separator", ["sweep", "--objectives", "kl", "--steps", "1_0", "--dry-run", *G],
         "--steps must be an integer, got '1_0'"),
    Case("sweep-file-seeds-word", sweep_file("seeds_word"), "seeds_word.yaml: seeds must be an integer, got 'a'"),
    Case("sweep-file-seeds-float", sweep_file("seeds_float"), "seeds must be an integer in [0, 4294967295], got 1.5"),
    Case("sweep-file-seeds-bool", sweep_file("seeds_bool"), "seeds must be an integer in [0, 4294967295], got True"),
    Case("sweep-file-seeds-2-32", sweep_file("seeds_2_32"), "seeds must be in [0, 4294967295], got 4294967296"),
    Case("sweep-file-seeds-negative", sweep_file("seeds_negative"), "seeds must be at least 0, got -1"),
    Case("sweep-file-seeds-empty", sweep_file("seeds_empty"), "seeds is empty"),
    Case("sweep-file-seeds-twice", sweep_file("seeds_twice"), "seeds lists 0 twice"),
    Case("sweep-file-seeds-separator", sweep_file("seeds_separator"), "seeds must be an integer, got '1_0'"),
    Case("sweep-file-objectives-string", sweep_file("objectives_string"), "objectives must be a list, e.g. objectives: [kl]"),
    Case("sweep-file-objectives-number", sweep_file("objectives_number"), "objectives must be objective names or "
         "settings (strings), got 3"),
    Case("sweep-file-workers-zero", sweep_file("workers_zero"), "workers must be in [1, 256], got 0", subprocess=True),
    Case("sweep-file-workers-word", sweep_file("workers_word"), "workers must be an integer, got 'two'"),
    Case("sweep-file-run-not-mapping", sweep_file("run_not_mapping"), "run must be a mapping of `kdbench run` options"),
    Case("sweep-file-run-steps-word", sweep_file("run_steps_word"), "run.steps must be an integer, got 'x'"),
    Case("sweep-file-run-steps-float", sweep_file("run_steps_float"), "run.steps must be an integer in [1, 1000000000]"),
    Case("sweep-file-run-flag-number", sweep_file("run_flag_number"), "run.no_save is a flag: true or false, got 1"),
    Case("sweep-file-run-lr-negative", sweep_file("run_lr_negative"), "run.lr must be a positive number"),
    Case("sweep-file-run-device", sweep_file("run_device"), "unknown device 'tpu'"),
    Case("sweep-file-params-empty", sweep_file("params_empty"), "params.tau is empty"),
    Case("sweep-file-params-undeclared", sweep_file("params_undeclared"), "params.nosuch: no objective of the sweep "
         "declares it"),
    Case("sweep-file-params-comma-string", sweep_file("params_comma_string"), "params.tau is the string '1,2': write a "
         "list, e.g. tau: [1, 2]"),
    Case("sweep-file-params-separator", sweep_file("params_separator"), "got '1_5': '_' digit separators"),
    Case("sweep-file-params-out-of-range", sweep_file("params_out_of_range"), "must be in [0.05, 100.0]"),
    Case("sweep-file-params-not-mapping", sweep_file("params_not_mapping"), "params must be a mapping of name: [values]"),
    Case("sweep-file-params-null-value", sweep_file("params_null_value"), "params.tau must be a list of values, got "
         "None in it"),
    Case("sweep-file-tune-empty", sweep_file("tune_empty"), "tune.lr is empty"),
    Case("sweep-file-tune-word", sweep_file("tune_word"), "tune.lr must be a number, got 'abc'"),
    Case("sweep-file-tune-negative", sweep_file("tune_negative"), "tune.lr must be a positive number"),
    Case("sweep-file-tune-infinite", sweep_file("tune_infinite"), "tune.lr must be a positive number, got inf"),
    # ---- data (paper suites, tiny models, --data-dir with one fault each)
    Case("data-malformed-jsonl", tiny("paper-task-gsm8k", "gsm_bad_json"), "gsm8k/test.jsonl:3: not JSON",
         subprocess=True),
    Case("data-empty-file", tiny("paper-task-gsm8k", "gsm_empty"), "gsm8k/test.jsonl is empty"),
    Case("data-blank-file", tiny("paper-task-gsm8k", "gsm_blank"), "gsm8k/test.jsonl is empty"),
    Case("data-missing-field", tiny("paper-task-gsm8k", "gsm_missing_field"),
         "gsm8k/train.jsonl:2: missing field(s) 'answer'"),
    Case("data-null-field", tiny("paper-task-gsm8k", "gsm_null_field"), "gsm8k/train.jsonl:3: field(s) 'question' are null"),
    Case("data-not-an-object", tiny("paper-task-gsm8k", "gsm_not_object"), "gsm8k/test.jsonl:2: a list, not a JSON object"),
    Case("data-no-final-number", tiny("paper-task-gsm8k", "gsm_no_number"), "test.jsonl:2: answer has no final number"),
    Case("data-bad-utf8", tiny("paper-task-gsm8k", "gsm_bad_utf8"), "test.jsonl: not UTF-8"),
    Case("data-missing-file", tiny("paper-task-gsm8k", "gsm_missing_test"), "data not found in the data directory"),
    Case("data-file-is-dir", tiny("paper-task-gsm8k", "gsm_test_is_dir"), "is a directory"),
    Case("data-dir-missing", tiny("paper-task-gsm8k", "no_such_root"), "does not exist"),
    Case("data-dir-is-file", tiny("paper-task-gsm8k", "a_file"), "does not exist"),
    Case("data-instruct-missing-instruction", tiny("paper-instruct", "instruct_missing_instruction"),
         "dolly/valid.jsonl:3: missing field(s) 'instruction'"),
    Case("data-json-array-malformed", tiny("paper-instruct", "instruct_bad_json_array"), "alpaca_eval.json:3: not JSON"),
    Case("data-instruct-empty-set", tiny("paper-instruct", "instruct_empty_sni"), "sni/minillm/valid.jsonl is empty"),
    Case("data-dialogsum-missing-dialogue", tiny("paper-task-dialogsum", "dialogsum_missing_dialogue"),
         "dialogsum.test.jsonl:1: missing field(s) 'dialogue'"),
    Case("data-multi30k-line-mismatch", tiny("paper-task-translation", "mt_mismatch"), "has 8 lines but"),
    Case("data-multi30k-empty-split", tiny("paper-task-translation", "mt_empty"), "is empty (no sentences)"),
    # ---- models: refused after they load, before anything is trained or written
    Case("vocab-mismatch", tiny("paper-task-gsm8k", "ok", student="{other_vocab}"), "different vocabularies"),
    Case("student-without-tokenizer", tiny("paper-task-gsm8k", "ok", student="{no_tok}"),
         "cannot load the student's tokenizer"),
]
assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture()
def isolated(world, monkeypatch):
    """A fresh registry, a clean environment and a scratch working directory for one case."""
    import torch
    import transformers

    monkeypatch.setattr(registry, "_state", registry._State())
    monkeypatch.setattr(plugins, "_modules", {})
    for var in ("KDBENCH_DB", "KDBENCH_PLUGIN_PATH", "KDBENCH_DATA_DIR", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # a refused command starts nothing (`kdbench leaderboard` would exec streamlit over this process)
    monkeypatch.setattr("os.execve", lambda *a: pytest.fail(f"a refused command exec'd {a[1]}"))
    monkeypatch.chdir(world["cwd"])
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # model loading bars are not the error line
    return world


def _check(rc: int, err: str, case: Case) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("kdbench: error:"), lines[0]
    assert case.expect in lines[0], f"{case.expect!r} not in {lines[0]!r}"
    for secret in case.never:
        assert secret not in err, f"{secret!r} shown: {err}"


def _params():
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        yield pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_one_line_exit_2_and_nothing_changes(case, isolated, capsys, monkeypatch):
    world = isolated
    for k, v in case.env.items():
        monkeypatch.setenv(k, fill(v, world))
    if case.gpus is not None:  # the CUDA devices this process sees, whatever the machine has
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: case.gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: case.gpus)
    args = [fill(a, world) for a in case.args]
    before = snapshot(world)
    rc = main(args)
    _, err = capsys.readouterr()
    _check(rc, err, case)
    assert snapshot(world) == before


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.subprocess and not c.gpus])
def test_bad_input_in_a_real_process(case, world):
    env = {**ENV, **{k: fill(v, world) for k, v in case.env.items()}}
    before = snapshot(world)
    res = subprocess.run([sys.executable, "-m", "kdbench", *[fill(a, world) for a in case.args]], cwd=world["cwd"],
                         env=env, capture_output=True, text=True, timeout=180)
    _check(res.returncode, res.stderr, case)
    assert snapshot(world) == before


# ---------------------------------------------------------------------------- before training


def test_vocabulary_mismatch_is_refused_before_the_teacher_is_finetuned(isolated, capsys, monkeypatch):
    world = isolated
    import kdbench.prepare

    def no_training(*a, **k):
        raise AssertionError("the teacher's fine-tuning started before the vocabulary check")

    monkeypatch.setattr(kdbench.prepare, "finetune_teacher", no_training)
    args = [a for a in tiny("paper-task-gsm8k", "ok", student="{other_vocab}") if a != "--teacher-finetuned"]
    before = snapshot(world)
    rc = main([fill(a, world) for a in args])
    _check(rc, capsys.readouterr().err, Case("x", [], "different vocabularies"))
    assert snapshot(world) == before


# ---------------------------------------------------------------------------- plug-ins that call sys.exit


BUILT_INS = ("ab", "akl", "ce", "csd", "dld", "hinton", "jeffreys", "jsd", "kl", "rkl", "skl", "skl_sym", "srkl", "tvd")


def _listing_is_complete(out: str, err: str) -> None:
    for name in (*BUILT_INS, "fineexit"):
        assert f"\n{name} " in out, f"{name} not listed:\n{out}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kdbench: warning: ") and "exits.py" in lines[0] and "it called sys.exit(0)" in lines[0]


def test_list_with_a_plugin_calling_sys_exit_lists_the_built_ins(isolated, capsys, monkeypatch):
    """Was: `kdbench list` printed nothing and exited 0 (the plug-in's SystemExit ended it)."""
    monkeypatch.setenv("KDBENCH_PLUGIN_PATH", str(isolated["pexit"]))
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    _listing_is_complete(out, err)


def test_list_with_a_plugin_calling_sys_exit_in_a_real_process(world):
    res = subprocess.run([sys.executable, "-m", "kdbench", "list"], cwd=world["cwd"], capture_output=True, text=True,
                         env={**ENV, "KDBENCH_PLUGIN_PATH": str(world["pexit"])}, timeout=180)
    assert res.returncode == 0, res.stderr
    _listing_is_complete(res.stdout, res.stderr)


def test_an_objective_calling_sys_exit_while_training_is_recorded_failed(isolated, capsys, monkeypatch, tmp_path):
    """After the run row exists: the run is `failed` with the reason, exit 1 (was: the process ended with the
    plug-in's exit code and left the run `running`). The contract checks, which would refuse it first
    (before anything is loaded, and at the start-up check), are stepped over here to reach training."""
    import sqlite3

    import kdbench.engine.check
    import kdbench.recipe

    monkeypatch.setattr(kdbench.engine.check, "check_contract_early", lambda objective: None)

    class Passed:
        def to_dict(self):
            return {"passed": True, "loss_fast": 0.0, "loss_dense": 0.0, "note": "skipped by the test"}

    monkeypatch.setattr(kdbench.recipe, "startup_check", lambda *a, **k: Passed())
    db = tmp_path / "runs.db"
    args = ["run", "--objective", "{plugins}/contract.py:exits",
            *tiny_run_flags("{teacher}", "{student}", "{data}/gsm_train24"), "--db", str(db)]
    rc = main([fill(a, isolated) for a in args])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "failed: ObjectiveContractError: objective 'exits'" in err and "sys.exit(0)" in err
    con = sqlite3.connect(db)
    status, reason = con.execute("SELECT status, error FROM runs WHERE role = 'distilled'").fetchone()
    con.close()
    assert status == "failed" and "it called sys.exit(0) while computing its loss" in reason


def test_a_prompt_longer_than_the_context_keeps_counted_response_tokens(world):
    """Decided behaviour: prompts are left-truncated to max_prompt_tokens (the instruction's end and
    the template survive), so every example keeps at least max_tokens - max_prompt_tokens response tokens."""
    from kdbench.data.batching import collate, encode
    from kdbench.models import load_tokenizer

    tok = load_tokenizer(world["teacher"])
    prompt = "Please summarise the following text. " + "word " * 20_000
    enc = encode(tok, prompt, "A short answer.", max_prompt_tokens=64, max_tokens=80)
    assert enc.n_prompt == 64 and 64 < len(enc.ids) <= 80
    batch = collate([enc], tok.pad_token_id)
    assert int(batch["loss_mask"].sum()) == len(enc.ids) - enc.n_prompt >= 1  # the whole short answer counts


def test_a_response_that_cannot_fit_any_token_is_an_error(world):
    from kdbench.data.batching import encode
    from kdbench.models import load_tokenizer

    tok = load_tokenizer(world["teacher"])
    with pytest.raises(ValueError, match="no response token"):
        encode(tok, "word " * 500, "An answer.", max_prompt_tokens=64, max_tokens=64)


def test_a_training_set_smaller_than_a_batch_is_an_error_not_a_hang(monkeypatch):
    import random as _random

    from kdbench.data import batching

    epochs = []

    class CountingRandom(_random.Random):  # batches() seeds one Random per epoch
        def __init__(self, seed):
            epochs.append(seed)
            if len(epochs) > 1000:
                raise AssertionError("batches() went through 1000 epochs without yielding a batch")
            super().__init__(seed)

    monkeypatch.setattr(batching, "random", type("R", (), {"Random": CountingRandom}))
    enc = [batching.Encoded([1, 2, 3, 4], 2) for _ in range(7)]
    try:
        batch = next(batching.batches(enc, 8, 0, 0))
    except AssertionError:
        raise
    except Exception as exc:  # a clear error is a fix too
        assert "batch" in str(exc)
    else:
        assert batch["input_ids"].shape[0] == 7
