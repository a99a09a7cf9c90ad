"""Paper suites on a CPU: the data builders on the real files of ../shared/data, the hub code
path, and tiny end-to-end runs with a random 2-layer Llama pair (d=64, the real SmolLM2
tokenizer) standing in for the GPU-sized hub models. Budgets and lengths are cut for speed;
the suite versions and everything else are the real specs'."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench import suites
from kdbench.data import sources as S
from kdbench.data.loaders import shared_data_dir
from kdbench.errors import UserError
from kdbench.store import Metric, Run, Sample, open_engine
from kdbench.suites import PAPER_INSTRUCT, PAPER_TASK_DIALOGSUM, PAPER_TASK_GSM8K, PAPER_TASK_TRANSLATION

try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


def test_paper_instruct_data_from_the_shared_files():
    d = S.build(PAPER_INSTRUCT, DATA)
    assert {k: len(v) for k, v in d.tests.items()} == {"dolly": 500, "self_instruct": 242, "vicuna": 80,
                                                       "sni": 1694, "unni": 20}
    # dolly/dev.jsonl (1,000) stands in for the missing train split: a fifth is held out for validation
    assert d.standin and d.manifest["dolly_train"]["standin"] and d.manifest["vicuna"]["standin"]
    assert len(d.valid) == 199 and len(d.train) == 800 and d.manifest["decontaminated"] == {"dolly_train": 1}
    # the papers' prompt: MiniLLM's Alpaca template, exactly as in the files
    raw = [json.loads(line) for line in open(DATA / "dolly/valid.jsonl", encoding="utf-8")]
    by_id = {e.id: e for e in d.tests["dolly"]}
    assert all(by_id[f"dolly:{i}"].prompt + "\n" == r["prompt"] for i, r in enumerate(raw))
    test_prompts = {S.norm_prompt(e.prompt) for v in d.tests.values() for e in v}
    assert not any(S.norm_prompt(e.prompt) in test_prompts for e in d.train + d.valid)  # decontaminated
    assert not {e.id for e in d.train} & {e.id for e in d.valid}
    assert [e.id for e in S.build(PAPER_INSTRUCT, DATA).train] == [e.id for e in d.train]  # deterministic


def test_task_data_from_the_shared_files():
    g = S.build(PAPER_TASK_GSM8K, DATA)
    assert (len(g.train), len(g.valid), len(g.tests["gsm8k"])) == (1000, 200, 1319) and not g.standin
    assert not {e.id for e in g.train} & {e.id for e in g.valid}
    assert all(e.id.startswith("gsm8k-train:") for e in g.train + g.valid) and g.train[0].meta["gold"]
    ds = S.build(PAPER_TASK_DIALOGSUM, DATA)  # dev stands in for the missing train split
    assert ds.standin and (len(ds.train), len(ds.valid)) == (396, 98)
    assert ds.manifest["decontaminated"] == {"dialogsum_train": 6}  # dev dialogues that are also test dialogues
    assert all(len(e.references) == 3 for e in ds.tests["dialogsum"]) and len(ds.tests["dialogsum"]) == 500
    tr = S.build(PAPER_TASK_TRANSLATION, DATA)
    assert (len(tr.train), len(tr.valid), len(tr.tests["translation"])) == (1000, 200, 1000)
    assert tr.valid[0].id.startswith("multi30k-val:") and tr.train[0].prompt.startswith("Translate the following English")


def test_hub_path_reads_the_hub_names(monkeypatch):
    """Without a data root every source goes through datasets.load_dataset by hub name; fed the
    real records, the hub path builds exactly what the local files build."""
    import datasets

    calls = []

    def fake(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return [json.loads(line) for line in open(DATA / f"gsm8k/{split}.jsonl", encoding="utf-8")]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    hub = S.build(PAPER_TASK_GSM8K, None)
    assert calls == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
    local = S.build(PAPER_TASK_GSM8K, DATA)
    assert [(e.prompt, e.references) for e in hub.train] == [(e.prompt, e.references) for e in local.train]
    assert hub.manifest["gsm8k"] == {"hub": "openai/gsm8k", "standin": False, "n": 1319}


def test_hub_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cannot load data source 'dialogsum' from hub knkarthick/dialogsum.*--data-dir"):
        S.build(PAPER_TASK_DIALOGSUM, None)


def test_vocabulary_mismatch_is_refused(tmp_path):
    from kdbench.prepare import check_vocabularies
    from kdbench.models import load_tokenizer

    teacher, student = make_tiny_pair(tmp_path)
    tok = load_tokenizer(teacher)
    check_vocabularies(tok, student)  # same tokenizer: fine
    other = load_tokenizer(student)
    other.add_tokens(["<kdbench-extra>"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="different vocabularies"):
        check_vocabularies(tok, tmp_path / "other")


# ---------------------------------------------------------------------------- tiny end-to-end runs


def small(spec, *, seeds=(10, 20)):
    """The real spec with CPU-sized lengths, decoding and fine-tuning budget."""
    cut = dict(max_prompt_tokens=64, max_tokens=80)
    return dataclasses.replace(
        spec, train=dataclasses.replace(spec.train, **cut),
        finetune=dataclasses.replace(spec.finetune, steps=2, epochs=None, **cut),
        eval=dataclasses.replace(spec.eval, seeds=seeds, max_new_tokens=12, n_valid=2),
        tasks=tuple(dataclasses.replace(t, max_new_tokens=None) for t in spec.tasks))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kdbench import finetune
    from kdbench.cli import main

    tmp = tmp_path_factory.mktemp("paper")
    teacher, student = make_tiny_pair(tmp / "models")
    mp = pytest.MonkeyPatch()
    mp.setattr(finetune, "cache_dir", lambda: tmp / "cache")
    for spec in (PAPER_INSTRUCT, PAPER_TASK_GSM8K, PAPER_TASK_TRANSLATION, PAPER_TASK_DIALOGSUM):
        mp.setitem(suites.SUITES, spec.name, small(spec))
    db = tmp / "runs.db"
    common = ["--objective", "csd", "--student", str(student), "--data-dir", str(DATA), "--steps", "2",
              "--eval-limit", "2", "--db", str(db), "--no-save", "--no-progress"]
    try:
        for suite in ("paper-instruct", "paper-task-gsm8k", "paper-task-translation"):
            assert main(["run", "--suite", suite, "--teacher", str(teacher), *common]) == 0
        assert main(["run", "--suite", "paper-task-dialogsum", "--teacher", str(teacher), "--teacher-finetuned",
                     *common]) == 0
    finally:
        mp.undo()
    return {"db": db, "teacher": teacher, "cache": tmp / "cache"}


def runs_of(db, suite):
    with Session(open_engine(str(db))) as s:
        return {r.role: r for r in s.scalars(select(Run).where(Run.suite == suite))}


def metrics_of(db, run_id):
    with Session(open_engine(str(db))) as s:
        return [(m.task, m.metric, m.value, m.seed) for m in s.scalars(select(Metric).where(Metric.run_id == run_id))]


def test_stored_versions_match_the_specs(tiny):
    for spec, extra in ((PAPER_INSTRUCT, ",data=standin"), (PAPER_TASK_GSM8K, ""), (PAPER_TASK_TRANSLATION, ""),
                        (PAPER_TASK_DIALOGSUM, ",data=standin")):
        runs = runs_of(tiny["db"], spec.name)
        assert set(runs) == {"teacher", "student-init", "distilled"}
        assert all(r.status == "finished" for r in runs.values())
        fin = "(finetuned)" if spec is PAPER_TASK_DIALOGSUM else ""
        want = f"{spec.version}+teacher=teacher{fin},student=student,steps=2,eval_limit=2{extra}"
        assert {r.suite_version for r in runs.values()} == {want}
        assert runs["distilled"].config["suite"]["version"] == spec.version


def test_paper_instruct_run_scores_five_sets_per_seed(tiny):
    run = runs_of(tiny["db"], "paper-instruct")["distilled"]
    rouge = [(t, s) for t, m, v, s in metrics_of(tiny["db"], run.id) if m == "rougeL"]
    assert sorted(rouge) == sorted((t, s) for t in ("dolly", "self_instruct", "vicuna", "sni", "unni") for s in (10, 20))
    assert run.selection_rule.startswith("best validation rougeL (dolly, sampled (seed 1), 2 prompts) every")
    assert run.config["data_sources"]["dolly_train"]["path"].endswith("dolly/dev.jsonl")
    assert str(tiny["cache"] / "teachers") in run.config["teacher_path"]  # the tiny teacher, fine-tuned and cached
    with Session(open_engine(str(tiny["db"]))) as s:
        prompt = s.scalars(select(Sample.prompt).where(Sample.run_id == run.id, Sample.task == "dolly")).first()
    assert prompt.startswith("Below is an instruction that describes a task")


def test_gsm8k_is_greedy_accuracy_and_translation_has_bleu(tiny):
    g = runs_of(tiny["db"], "paper-task-gsm8k")["distilled"]
    mets = metrics_of(tiny["db"], g.id)
    assert [(m, s) for t, m, v, s in mets if m == "accuracy"] == [("accuracy", None)]
    assert not any(s is not None for *_, s in mets)  # greedy only: no per-seed rows
    assert g.selection_rule.startswith("best validation accuracy (gsm8k, greedy, 2 prompts)")
    t = runs_of(tiny["db"], "paper-task-translation")["distilled"]
    names = {(m, s) for _, m, v, s in metrics_of(tiny["db"], t.id)}
    assert {("bleu", None), ("chrf", None), ("bleu_sampled", 10), ("chrf_sampled", 20), ("self_bleu", 10)} <= names
    assert t.selection_rule.startswith("best validation bleu (multi30k_en_de, greedy")


def test_teacher_finetuned_flag_skips_the_teacher_fine_tuning(tiny):
    run = runs_of(tiny["db"], "paper-task-dialogsum")["distilled"]
    assert run.config["teacher_path"] == str(tiny["teacher"])
    assert run.config["suite"]["pairs"]["custom"]["teacher_finetuned"] is True
