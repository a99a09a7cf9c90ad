"""The world the bad-input corpus (tests/test_bad_input.py) runs in: run stores damaged in every
way a file can be, plug-in files that fail in every way an import can, data folders in the
layout of ../shared/data with one fault each, the tiny model pair, and a snapshot of all of it,
so a case can show that nothing was created or changed."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import textwrap
from pathlib import Path

import pytest

from kdbench.store import RunWriter, open_engine

try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("KDBENCH_DB", None)
ENV.pop("KDBENCH_PLUGIN_PATH", None)
ENV.pop("KDBENCH_DATA_DIR", None)


# ---------------------------------------------------------------------------- the world


def _store(path: Path, runs: int = 1) -> Path:
    engine = open_engine(str(path))
    for i in range(runs):
        w = RunWriter.start(engine, role="distilled", suite="micro", suite_version="1", seed=i, config={},
                            provenance={}, objective="kl", params={}, setting="kl")
        w.metrics([("chatterbot", "rougeL", 12.5, 10)])
        w.finish()
    engine.dispose()
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def _sql(path: Path, *statements: str) -> None:
    con = sqlite3.connect(path)
    for s in statements:
        con.execute(s)
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def _jsonl(path: Path, rows, *, raw: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_text(raw, encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


GSM_TRAIN = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 9)]
GSM_TEST = [{"question": f"What is {i} times 3?", "answer": f"{i} * 3 = {3 * i}\n#### {3 * i}"} for i in range(1, 5)]
MINILLM = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"Word {i} is here, as you asked."}
           for i in range(6)]


def _gsm8k(root: Path, *, train=None, test=None, train_raw=None, test_raw=None, skip_test=False) -> Path:
    _jsonl(root / "gsm8k" / "train.jsonl", train if train is not None else GSM_TRAIN, raw=train_raw)
    if not skip_test:
        _jsonl(root / "gsm8k" / "test.jsonl", test if test is not None else GSM_TEST, raw=test_raw)
    return root


def _instruct(root: Path, **override) -> Path:
    files = {"dolly/dev.jsonl": MINILLM, "dolly/valid.jsonl": MINILLM, "self_instruct/minillm/valid.jsonl": MINILLM,
             "vicuna/minillm/valid.jsonl": MINILLM, "sni/minillm/valid.jsonl": MINILLM,
             "unni/minillm/11_/valid.jsonl": MINILLM}
    for rel, rows in files.items():
        if rel in override:
            value = override[rel]
            if value is None:
                continue
            if isinstance(value, str):
                _jsonl(root / rel, None, raw=value)
            else:
                _jsonl(root / rel, value)
        else:
            _jsonl(root / rel, [{**r, "instruction": f"{r['instruction']} ({rel})"} for r in rows])
    for rel, value in override.items():
        if rel not in files and value is not None:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(value, encoding="utf-8")
    return root


def _multi30k(root: Path, *, test_de: str | None = None, test_en: str | None = None) -> Path:
    d = root / "translation" / "multi30k"
    d.mkdir(parents=True, exist_ok=True)
    en = [f"A dog runs number {i}." for i in range(8)]
    de = [f"Ein Hund rennt Nummer {i}." for i in range(8)]
    for split in ("train", "val", "test_2016_flickr"):
        (d / f"{split}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
        (d / f"{split}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    if test_de is not None:
        (d / "test_2016_flickr.de").write_text(test_de, encoding="utf-8")
    if test_en is not None:
        (d / "test_2016_flickr.en").write_text(test_en, encoding="utf-8")
    return root


PLUGIN = '''
from kdbench.registry import objective


@objective("{name}", behaviour="balanced", paper="a test plugin")
def {name}(s, t):
    """Squared error of logits (test plugin).

    L = mean_v (s - t)^2
    """
    return (s - t).pow(2).mean(-1)
'''

# Objectives that import and register fine but break the contract of docs/adding-an-objective.md
# when called: the start-up check names each, before the run exists.
CONTRACT_PLUGIN = '''
import sys

import torch

from kdbench.registry import objective


def _sq(s, t):
    return (s - t).pow(2).mean(-1)


@objective("nosig", behaviour="balanced", paper="-")
def nosig(s):  # no teacher argument
    return s.sum(-1)


@objective("scalar", behaviour="balanced", paper="-")
def scalar(s, t):  # the mean, not one value per position
    return _sq(s, t).mean()


@objective("full", behaviour="balanced", paper="-")
def full(s, t):  # [N, V], not [N]
    return (s - t).pow(2)


@objective("triple", behaviour="balanced", paper="-")
def triple(s, t):
    return _sq(s, t), {}, None


@objective("asdict", behaviour="balanced", paper="-")
def asdict(s, t):
    return {"loss": _sq(s, t)}


@objective("intloss", behaviour="balanced", paper="-")
def intloss(s, t):  # integer mistakes count: no gradient, wrong dtype
    return (s.argmax(-1) != t.argmax(-1)).long()


@objective("detached", behaviour="balanced", paper="-")
def detached(s, t):
    return _sq(s, t).detach()


@objective("exits", behaviour="balanced", paper="-")
def exits(s, t):
    sys.exit(0)


@objective("badterms", behaviour="balanced", paper="-")
def badterms(s, t):
    return _sq(s, t), [1, 2]


@objective("termshape", behaviour="balanced", paper="-")
def termshape(s, t):
    return _sq(s, t), {"gap": (s - t).abs()}


@objective("mutates", behaviour="balanced", paper="-")
def mutates(s, t):
    t.mul_(0.5)
    return _sq(s, t)


@objective("returnsnone", behaviour="balanced", paper="-")
def returnsnone(s, t):
    pass


@objective("raises", behaviour="balanced", paper="-")
def raises(s, t):
    raise KeyError("vocab")


@objective("nondet", behaviour="balanced", paper="-")
def nondet(s, t):  # keeps its contract, through an op with no deterministic implementation (put_ on the CPU)
    v = _sq(s, t)
    return torch.zeros_like(v).put(torch.arange(v.numel()), v)


def _short_gradient(s, t):
    return _sq(s, t), {}, (s - t)[:, :3]


@objective("badgrad", behaviour="balanced", paper="-", gradient=_short_gradient)
def badgrad(s, t):
    return _sq(s, t)
'''

# Sweep files with one mistake each (`kdbench sweep {sweeps}/NAME.yaml --dry-run`).
SWEEP_FILES = {
    "seeds_word": "objectives: [kl]\nseeds: [a]\n",
    "seeds_float": "objectives: [kl]\nseeds: 1.5\n",
    "seeds_bool": "objectives: [kl]\nseeds: true\n",
    "seeds_2_32": "objectives: [kl]\nseeds: [4294967296]\n",
    "seeds_negative": "objectives: [kl]\nseeds: [-1]\n",
    "seeds_empty": "objectives: [kl]\nseeds: []\n",
    "seeds_twice": "objectives: [kl]\nseeds: [0, 1, 0]\n",
    "seeds_separator": "objectives: [kl]\nseeds: [1_0]\n",
    "objectives_string": "objectives: kl\n",
    "objectives_number": "objectives: [kl, 3]\n",
    "workers_zero": "objectives: [kl]\nworkers: 0\n",
    "workers_word": "objectives: [kl]\nworkers: two\n",
    "run_not_mapping": "objectives: [kl]\nrun: [steps]\n",
    "run_steps_word": "objectives: [kl]\nrun: {steps: x}\n",
    "run_steps_float": "objectives: [kl]\nrun: {steps: 2.5}\n",
    "run_flag_number": "objectives: [kl]\nrun: {no_save: 1}\n",
    "run_lr_negative": "objectives: [kl]\nrun: {lr: -1.0e-4}\n",
    "run_device": "objectives: [kl]\nrun: {device: tpu}\n",
    "params_empty": "objectives: [csd]\nparams: {tau: []}\n",
    "params_undeclared": "objectives: [kl, csd]\nparams: {nosuch: [1]}\n",
    "params_comma_string": "objectives: [csd]\nparams: {tau: '1,2'}\n",
    "params_separator": "objectives: [csd]\nparams: {tau: [1_5]}\n",
    "params_out_of_range": "objectives: [csd]\nparams: {tau: [1.0e-320]}\n",
    "params_not_mapping": "objectives: [csd]\nparams: [tau]\n",
    "params_null_value": "objectives: [csd]\nparams: {tau: [null]}\n",
    "tune_empty": "objectives: [kl]\ntune: {lr: []}\n",
    "tune_word": "objectives: [kl]\ntune: {lr: [abc]}\n",
    "tune_negative": "objectives: [kl]\ntune: {lr: [-1.0e-4]}\n",
    "tune_infinite": "objectives: [kl]\ntune: {lr: [.inf]}\n",
}


def tiny_run_flags(teacher, student, data_dir) -> list[str]:
    """The flags of a tiny run of paper-task-gsm8k (objective and store aside), as the corpus's
    start-up check cases pass them and as the world's prepared store was made with."""
    return ["--suite", "paper-task-gsm8k", "--teacher", str(teacher), "--teacher-finetuned", "--student", str(student),
            "--data-dir", str(data_dir), "--steps", "1", "--eval-limit", "1", "--no-save", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("badinput")
    stores = w / "stores"
    stores.mkdir()
    good = _store(stores / "good.db", runs=2)
    (stores / "corrupt.db").write_bytes(os.urandom(8192))
    (stores / "textfile.db").write_text("this is not a database\n" * 50)
    data = good.read_bytes()
    (stores / "truncated.db").write_bytes(data[: len(data) // 2])
    (stores / "header_only.db").write_bytes(data[:100])
    (stores / "empty.db").write_bytes(b"")
    (stores / "dir.db").mkdir()
    _sql(stores / "foreign.db", "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO users VALUES (1, 'x')")
    _sql(stores / "runs_no_version.db", "CREATE TABLE runs (id INTEGER PRIMARY KEY)",
         "CREATE TABLE kdbench_meta (key TEXT PRIMARY KEY, value TEXT)")
    _sql(_store(stores / "newer.db"), "UPDATE kdbench_meta SET value = '999' WHERE key = 'schema_version'")
    _sql(_store(stores / "bad_version.db"), "UPDATE kdbench_meta SET value = 'two' WHERE key = 'schema_version'")
    _sql(_store(stores / "damaged.db"), "ALTER TABLE runs DROP COLUMN pid")
    _sql(_store(stores / "no_curves.db"), "DROP TABLE curves")

    plugins = w / "plugins"
    plugins.mkdir()
    (plugins / "good.py").write_text(textwrap.dedent(PLUGIN.format(name="goodplug")))
    (plugins / "syntax.py").write_text("def oops(:\n    pass\n")
    (plugins / "raises.py").write_text("raise RuntimeError('plug-in exploded at import')\n")
    (plugins / "importerr.py").write_text("import kdbench_module_that_does_not_exist\n")
    (plugins / "noobj.py").write_text("x = 1\n")
    (plugins / "dup.py").write_text(textwrap.dedent(PLUGIN.format(name="kl")))
    (plugins / "two.py").write_text(textwrap.dedent(PLUGIN.format(name="twoa") + PLUGIN.format(name="twob")))
    (plugins / "badbehaviour.py").write_text(textwrap.dedent('''
        from kdbench.registry import objective
        @objective("badbeh", behaviour="greedy", paper="-")
        def badbeh(s, t):
            return s.sum(-1)
    '''))
    (plugins / "folder.py").mkdir()
    # plug-ins that end the process, hold odd objects, or break the objective contract when called
    (plugins / "exit0.py").write_text("import sys\nsys.exit(0)\n")
    (plugins / "exitmsg.py").write_text("raise SystemExit('plug-in wants out')\n")
    (plugins / "oddattr.py").write_text(textwrap.dedent('''
        class Odd:
            def __getattr__(self, name):
                raise RuntimeError("odd object: no " + name)
        odd = Odd()
    '''))
    (plugins / "contract.py").write_text(CONTRACT_PLUGIN)
    pexit = w / "plugin_path_exit"  # $KDBENCH_PLUGIN_PATH with a plug-in calling sys.exit(0) at import
    pexit.mkdir()
    (pexit / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (pexit / "fine.py").write_text(textwrap.dedent(PLUGIN.format(name="fineexit")))
    # gsm8k with enough training examples for a batch: the contract cases reach the start-up check
    _gsm8k(w / "data" / "gsm_train24", train=[{**r, "question": f"{r['question']} ({k})"}
                                              for k in range(3) for r in GSM_TRAIN])
    sweeps = w / "sweeps"  # sweep files, one mistake each (SWEEP_FILES)
    sweeps.mkdir()
    for name, text in SWEEP_FILES.items():
        (sweeps / f"{name}.yaml").write_text(text)
    pdir = w / "plugin_path"
    pdir.mkdir()
    (pdir / "syntaxobj.py").write_text("def oops(:\n")
    (pdir / "fine.py").write_text(textwrap.dedent(PLUGIN.format(name="fineplug")))

    models = w / "models"
    teacher, student = make_tiny_pair(models)
    from kdbench.models import load_tokenizer

    other = load_tokenizer(student)
    other.add_tokens(["<kdbench-extra-token>"])
    other_dir = models / "student_other_vocab"
    import shutil

    shutil.copytree(student, other_dir)
    other.save_pretrained(other_dir)
    no_tok = models / "student_no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text("{}")
    # a store already holding the reference rows of the tiny pair on gsm_train24 (`kdbench prepare`
    # writes them): a run refused by its start-up check must leave it exactly as it was
    from kdbench.cli import main as kdbench_main

    prepared = stores / "prepared.db"
    assert kdbench_main(["prepare", *tiny_run_flags(teacher, student, w / "data" / "gsm_train24"), "--db",
                         str(prepared)]) == 0
    import gc

    gc.collect()  # the command's engine and its pooled connections: closing one later must not checkpoint
    _sql(prepared)  # the WAL into the file now, so its bytes stay as they are

    d = w / "data"
    _gsm8k(d / "ok")
    _gsm8k(d / "gsm_bad_json", test_raw=json.dumps(GSM_TEST[0]) + "\n" + json.dumps(GSM_TEST[1]) + "\n{oops\n")
    _gsm8k(d / "gsm_empty", test_raw="")
    _gsm8k(d / "gsm_blank", test_raw="\n   \n\n")
    _gsm8k(d / "gsm_missing_field", train=[GSM_TRAIN[0], {"question": "no answer here"}, *GSM_TRAIN[2:]])
    _gsm8k(d / "gsm_null_field", train=[GSM_TRAIN[0], GSM_TRAIN[1], {"question": None, "answer": "#### 1"}])
    _gsm8k(d / "gsm_not_object", test_raw=json.dumps(GSM_TEST[0]) + "\n[1, 2, 3]\n")
    _gsm8k(d / "gsm_no_number", test=[GSM_TEST[0], {"question": "q?", "answer": "no number at all"}])
    _gsm8k(d / "gsm_missing_test", skip_test=True)
    _gsm8k(d / "gsm_bad_utf8")
    (d / "gsm_bad_utf8" / "gsm8k" / "test.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    _gsm8k(d / "gsm_test_is_dir", skip_test=True)
    (d / "gsm_test_is_dir" / "gsm8k" / "test.jsonl").mkdir()
    (d / "a_file").write_text("not a folder")
    _instruct(d / "instruct_missing_instruction",
              **{"dolly/valid.jsonl": [MINILLM[0], MINILLM[1], {"input": "", "output": "answer without a question"}]})
    _instruct(d / "instruct_bad_json_array",
              **{"vicuna/minillm/valid.jsonl": None, "alpaca_eval/alpaca_eval.json": '[\n  {"instruction": "a"},\n  {oops}\n]'})
    _instruct(d / "instruct_empty_sni", **{"sni/minillm/valid.jsonl": ""})
    dialogsum = d / "dialogsum_missing_dialogue" / "dialogsum"
    _jsonl(dialogsum / "dialogsum.train.jsonl", [{"fname": f"t{i}", "dialogue": f"#A#: hi {i}", "summary": "A greets."}
                                                  for i in range(6)])
    _jsonl(dialogsum / "dialogsum.dev.jsonl", [{"fname": f"d{i}", "dialogue": f"#B#: yo {i}", "summary": "B greets."}
                                                for i in range(6)])
    _jsonl(dialogsum / "dialogsum.test.jsonl", [{"fname": "x1", "summary1": "no dialogue", "summary2": "s",
                                                  "summary3": "s"}])
    _multi30k(d / "mt_mismatch", test_de="Ein Satz.\n")
    _multi30k(d / "mt_empty", test_de="", test_en="")

    # a teacher cache ($KDBENCH_CACHE) with one entry in each of its caches; their keys share the
    # prefix 3fa2 (an ambiguous prefix), and a dangling link where a cache folder could be named
    cache = w / "cache"
    t_key, p_key = "3fa2c9d41b7e05a86c1d92e4", "3fa27b10c4d8e9f2a3b5c6d7"  # as tests/test_bad_input.py names them
    t_entry = cache / "teacher-hidden" / t_key
    t_entry.mkdir(parents=True)
    (t_entry / "hidden.bin").write_bytes(bytes(2 * 4 * 4))  # 2 rows of d=4, float32
    (t_entry / "index.json").write_text(json.dumps({"ex0": [0, 2, "0" * 16]}))
    (t_entry / "meta.json").write_text(json.dumps({
        "key": t_key, "format": 2, "dtype": "float32", "n_rows": 2, "d": 4, "n_examples": 1,
        "created_at": "2025-01-01T00:00:00Z", "inputs": {"teacher": {"weights": "ab" * 32}}}))
    (t_entry / "last_used").touch()
    p_entry = cache / "teacher-prompts" / p_key
    p_entry.mkdir(parents=True)
    (p_entry / "prefix.pt").write_bytes(b"\0" * 64)
    (p_entry / "meta.json").write_text(json.dumps({
        "key": p_key, "format": 1, "batches": 1, "layers": 1, "created_at": "2025-01-01T00:00:00Z",
        "inputs": {"dtype": "float32", "threads": 1, "teacher": {"weights": "ab" * 32}}}))
    (w / "cache_dangling").symlink_to(w / "no_such_cache_folder")

    scratch = w / "cwd"
    scratch.mkdir()
    return {"root": w, "stores": stores, "good": good, "plugins": plugins, "pdir": pdir, "teacher": teacher,
            "student": student, "other_vocab": other_dir, "no_tok": no_tok, "data": d, "cwd": scratch,
            "pexit": pexit, "sweeps": sweeps, "prepared": prepared}


# ---------------------------------------------------------------------------- what a case sees


def fill(value: str, world: dict) -> str:
    return value.format(**{k: str(v) for k, v in world.items()})


def snapshot(world: dict) -> dict:
    """Every file under the world's store and data folders (SQLite side files aside) and row counts."""
    out = {}
    for base in (world["stores"], world["data"], world["plugins"], world["cwd"], world["root"] / "cache"):
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith(("-wal", "-shm")) and "__pycache__" not in p.parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    cache = world["root"] / "cache"  # its folders too (a created one counts), and no run's "last used" stamp
    out.update({str(p): "folder" for p in cache.rglob("*") if p.is_dir()})
    out.update({str(p): p.stat().st_mtime_ns for p in cache.rglob("last_used")})
    out["dangling cache link's target"] = (world["root"] / "no_such_cache_folder").exists()
    con = sqlite3.connect(f"file:{world['good']}?mode=ro", uri=True)
    out["rows"] = tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                        for t in ("runs", "metrics", "curves", "samples", "artifacts"))
    con.close()
    con = sqlite3.connect(f"file:{world['prepared']}?mode=ro", uri=True)  # the start-up check cases' store
    out["prepared rows"] = tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                                 for t in ("runs", "metrics", "curves", "samples", "artifacts"))
    con.close()
    return out
