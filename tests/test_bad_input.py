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


def tiny(world_suite: str, data: str, *extra: str, student: str = "{student}") -> list:
    return ["run", "--objective", "csd", "--suite", world_suite, "--teacher", "{teacher}", "--teacher-finetuned",
            "--student", student, "--data-dir", "{data}/" + data, "--steps", "1", "--eval-limit", "1",
            "--no-save", "--no-progress", "--db", "{good}", *extra]


RUN = ["run", "--objective"]
G = ["--db", "{good}"]

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
    Case("param-zero", RUN + ["csd", "--param", "tau=0", *G], "must be in (0.0, inf)"),
    Case("param-negative", RUN + ["csd", "--param", "tau=-1", *G], "must be in (0.0, inf)"),
    Case("param-nan", RUN + ["csd", "--param", "tau=nan", *G], "finite"),
    Case("param-inf", RUN + ["csd", "--param", "tau=inf", *G], "finite"),
    Case("param-overflow", RUN + ["csd", "--param", "tau=1e400", *G], "finite"),
    Case("param-bad-choice", RUN + ["csd", "--param", "w1=X", *G], "w1"),
    Case("param-choice-typo", RUN + ["dld", "--param", "norm=meen", *G], "mean"),
    Case("param-out-of-range", RUN + ["jsd", "--param", "beta=1.5", *G], "must be in [0.0, 1.0]"),
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
    Case("gc-stale-negative", ["gc", "--stale-after", "-5", *G], "--stale-after must be a positive"),
    Case("gc-mark-and-delete", ["gc", "--mark", "--delete", *G], "not allowed with"),
    # ---- suites, pairs, devices, models
    Case("suite-typo", RUN + ["csd", "--suite", "mikro", *G], "unknown suite 'mikro'"),
    Case("suite-empty", RUN + ["csd", "--suite", "", *G], "unknown suite ''"),
    Case("pair-unknown", RUN + ["csd", "--pair", "nope", *G], "unknown pair for suite micro 'nope'"),
    Case("device-unknown", RUN + ["csd", "--device", "tpu", *G], "unknown device 'tpu'"),
    Case("device-malformed", RUN + ["csd", "--device", "cuda:x", *G], "unknown device 'cuda:x'"),
    Case("data-dir-on-embedded-suite", RUN + ["csd", "--data-dir", "{data}/ok", *G], "has embedded data"),
    Case("teacher-finetuned-alone", RUN + ["csd", "--teacher-finetuned", *G], "--teacher-finetuned needs --teacher"),
    Case("teacher-missing-folder", RUN + ["csd", "--teacher", "/nonexistent/teacher", *G], "no such model folder"),
    Case("student-missing-folder", RUN + ["csd", "--student", "./no-such-student", *G], "no such model folder"),
    # ---- the command line itself
    Case("no-command", [], "the following arguments are required: command"),
    Case("unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("run-without-objective", ["run", *G], "--objective"),
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
    for var in ("KDBENCH_DB", "KDBENCH_PLUGIN_PATH", "KDBENCH_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
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


def _params():
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        yield pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_one_line_exit_2_and_nothing_changes(case, isolated, capsys, monkeypatch):
    world = isolated
    for k, v in case.env.items():
        monkeypatch.setenv(k, fill(v, world))
    args = [fill(a, world) for a in case.args]
    before = snapshot(world)
    rc = main(args)
    _, err = capsys.readouterr()
    _check(rc, err, case)
    assert snapshot(world) == before


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.subprocess])
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
