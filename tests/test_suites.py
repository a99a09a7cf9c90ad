"""Suite specs: shapes, the paper's protocol values, version labels and the `run` flags' errors.
Nothing here loads a model."""

from __future__ import annotations

import pytest

from kdbench.cli import main
from kdbench.data import sources
from kdbench.data.loaders import shared_data_dir
from kdbench.errors import UserError
from kdbench.config import RunConfig, resolve_suite
from kdbench.evaluation.scoring import ANSWERS
from kdbench.suites.embedded import STUDENT_BLOCKS
from kdbench.suites import (FAMILIES, MICRO, MICRO_TASK, PAPER_INSTRUCT, PAPER_TASK_GSM8K, SUITES, EvalSpec, SuiteSpec,
                            TrainSpec, get_suite)

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


def label(**kw) -> str:
    return resolve_suite(RunConfig(objective="kl", **kw))[1]


def test_spine_imports_and_micro_shape_are_kept():
    assert get_suite("micro") is MICRO and isinstance(MICRO, SuiteSpec)
    assert isinstance(MICRO.train, TrainSpec) and isinstance(MICRO.eval, EvalSpec)
    assert MICRO.teacher == "embedded:smollm2-135m-instruct"
    assert MICRO.student == {"kind": "layer_subset", "keep": STUDENT_BLOCKS, "from": "teacher"}
    assert len(STUDENT_BLOCKS) == 24 and MICRO.finetune is not None and MICRO.system_prompt == ""
    assert MICRO.data == {"loader": "micro", "valid_frac": 0.08, "test_frac": 0.25, "closed_book": ["trivia"]}
    # the headline is the open task (first); closed-book trivia is scored apart by exact answer
    assert [t.name for t in MICRO.tasks] == ["chatterbot", "trivia"] and MICRO.tasks[0].headline == "rougeL"
    assert (MICRO.tasks[1].kind, MICRO.tasks[1].source, MICRO.tasks[1].greedy) == ("exact", "closed_book", True)
    assert MICRO.eval.seeds == (10, 20, 30, 40, 50)  # the paper's five sampling seeds
    d = MICRO.to_dict()
    assert d["teacher"] == MICRO.teacher and d["train"]["steps"] == MICRO.train.steps and d["version"] == "4"


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_suite_is_well_formed(name):
    s = SUITES[name]
    assert s.version and "+" not in s.version and s.description and s.licences
    assert s.default_pair in s.pairs and s.pair is None
    names = [t.name for t in s.tasks]
    assert names and len(set(names)) == len(names)
    builder_sources = sources.BUILDERS[s.data["loader"]][1]
    # embedded data (no data root): the sources are what the builder returns (micro: test, closed_book)
    embedded = set(sources.build(s, None).tests) if not builder_sources else None
    for t in s.tasks:
        assert t.kind in ("open", "exact", "translation") and (t.sample or t.greedy)
        assert (t.answer in ANSWERS) == (t.kind == "exact")
        assert t.source in embedded if embedded is not None else t.source in builder_sources
    for p in s.pairs.values():
        assert p.student["kind"] in ("layer_subset", "pretrained") and p.note
    assert s.train.steps > 0 or s.train.epochs


def test_paper_protocol_values():
    """REFERENCE §3, in the specs."""
    s = PAPER_INSTRUCT
    assert (s.train.lr, s.train.batch_size, s.train.epochs) == (1e-4, 8, 20)
    assert (s.train.max_prompt_tokens, s.train.max_tokens, s.eval.max_new_tokens) == (256, 512, 256)
    assert (s.eval.seeds, s.eval.temperature, s.eval.top_p, s.eval.top_k) == ((10, 20, 30, 40, 50), 1.0, 1.0, 0)
    assert [t.name for t in s.tasks] == ["dolly", "self_instruct", "vicuna", "sni", "unni"]
    assert s.task("unni").n_test == 10_000 and s.valid_task.name == "dolly" and s.finetune is not None
    pairs = {k: (p.teacher, p.student["name"]) for k, p in s.pairs.items()}
    assert pairs == {"gpt2-xl-to-base": ("openai-community/gpt2-xl", "openai-community/gpt2"),
                     "gpt2-xl-to-medium": ("openai-community/gpt2-xl", "openai-community/gpt2-medium"),
                     "openllama2-7b-to-3b": ("openlm-research/open_llama_7b_v2", "openlm-research/open_llama_3b_v2")}
    g = PAPER_TASK_GSM8K.tasks[0]
    assert (g.kind, g.answer, g.greedy, g.sample, g.headline) == ("exact", "final_number", True, False, "accuracy")
    assert set(FAMILIES["paper-task"]) == {"paper-task-gsm8k", "paper-task-dialogsum", "paper-task-translation"}
    for n in FAMILIES["paper-task"]:
        t = SUITES[n]
        assert t.data["n_train"] == 1000 and t.teacher == "google/gemma-7b-it"
        assert t.student == {"kind": "pretrained", "name": "google/gemma-2b-it"}
    assert SUITES["paper-task-translation"].tasks[0].headline == "bleu"
    mt = MICRO_TASK.tasks[0]
    assert (mt.kind, mt.headline, mt.greedy) == ("exact", "accuracy", True) and MICRO_TASK.eval.valid_every > 0


@needs_data
def test_version_labels():
    assert label() == MICRO.version == "4"
    assert label(steps=3, eval_limit=3) == "4+steps=3,eval_limit=3"
    assert label(finetune_steps=2, steps=3) == "4+finetune_steps=2,steps=3"
    assert label(suite="paper-instruct", data_dir=str(DATA)) == "2+data=standin"  # dolly/dev.jsonl stands in for train
    assert label(suite="paper-instruct", pair="gpt2-xl-to-base", data_dir=str(DATA)) == "2+data=standin"
    assert label(suite="paper-instruct", pair="gpt2-xl-to-medium", steps=5, data_dir=str(DATA)) == \
        "2+pair=gpt2-xl-to-medium,steps=5,data=standin"
    assert label(suite="paper-task-gsm8k", data_dir=str(DATA)) == "2"  # the real GSM8K files: comparable
    assert label(suite="paper-task-gsm8k") == "2"  # the hub
    assert label(suite="paper-task-gsm8k", student="google/gemma-2b", data_dir=str(DATA)) == "2+student=gemma-2b"
    suite, _ = resolve_suite(RunConfig(objective="kl", suite="paper-instruct", steps=7))
    assert suite.train.steps == 7 and suite.train.epochs is None


def test_data_root_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="data not found in the data directory"):
        label(suite="paper-task-gsm8k")
    (tmp_path / "gsm8k").mkdir()
    for f in ("train.jsonl", "test.jsonl"):
        (tmp_path / "gsm8k" / f).write_text("")
    assert label(suite="paper-task-gsm8k") == "2"


@pytest.mark.parametrize("args, expected", [
    (["--suite", "paper-task"], "'paper-task' is a family of suites"),
    (["--suite", "paper-instruct", "--pair", "gpt2"], "unknown pair for suite paper-instruct 'gpt2'"),
    (["--suite", "micro", "--data-dir", "."], "suite micro has embedded data"),
    (["--suite", "paper-task-gsm8k", "--data-dir", "/nonexistent"], "data directory /nonexistent does not exist"),
    (["--suite", "paper-task-gsm8k", "--teacher", "./no-such-model"], "--teacher ./no-such-model: no such model"),
    (["--suite", "paper-task-gsm8k", "--teacher-finetuned"], "--teacher-finetuned needs --teacher"),
    (["--suite", "paper-task-gsm8k", "--teacher", ".", "--teacher-finetuned", "--finetune-steps", "2"],
     "does not fine-tune its teacher here"),
])
def test_bad_run_flags_are_one_line_errors(args, expected, tmp_path, capsys):
    db = tmp_path / "runs.db"
    assert main(["run", "--objective", "csd", "--db", str(db), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdbench: error:") and expected in err[0], err
    assert not db.exists()


def test_list_shows_versions_tasks_and_pairs(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for s in SUITES.values():
        assert f"{s.name} (v{s.version})" in out
    assert "word-questions [exact: accuracy, greedy+sample]" in out
    assert "pair gpt2-xl-to-medium: openai-community/gpt2-xl -> openai-community/gpt2-medium" in out
    assert "openlm-research/open_llama_3b_v2" in out and "gsm8k [exact: accuracy, greedy]" in out
