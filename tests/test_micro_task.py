"""micro-task: the exact-answer data built from real chatterbot-corpus sentences, its scoring,
the cached teacher fine-tuning, and one tiny end-to-end run with the real SmolLM2 teacher.

The real fine-tuning budget (150 steps) is measured once and reported in docs/suites.md; here
it is overridden to one step so the run's wiring is tested in seconds."""

from __future__ import annotations

import dataclasses

import pytest

from kdbench import suites
from kdbench.data import micro_task as MT
from kdbench.data.loaders import Example
from kdbench.evaluation.scoring import is_correct, score_decode
from tests.fixtures_store import rows
from kdbench.store import CurvePoint, Metric, Run, Sample
from kdbench.suites import MICRO_TASK, TrainSpec

try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

# Pinned: any change to the construction changes these and must bump MICRO_TASK.version.
SIZES = {"train": 5065, "valid": 500, "test": 925}


@pytest.fixture(scope="module")
def splits():
    return MT.build_splits()


def test_split_sizes_are_pinned_and_deterministic(splits):
    assert {k: len(v) for k, v in splits.items()} == SIZES
    again = MT.build_splits()
    for k in splits:
        assert [(e.id, e.prompt, e.references) for e in splits[k]] == [(e.id, e.prompt, e.references) for e in again[k]]
    sentences = {k: {e.meta["sentence"].lower() for e in v} for k, v in splits.items()}
    assert not (sentences["train"] & sentences["test"]) and not (sentences["train"] & sentences["valid"])
    assert not (sentences["valid"] & sentences["test"])
    assert len({e.id for v in splits.values() for e in v}) == sum(SIZES.values())


def test_every_answer_is_exact(splits):
    """Recompute each answer independently from the sentence and the question."""
    import re

    for e in (e for v in splits.values() for e in v):
        s, kind, (answer,) = e.meta["sentence"], e.meta["kind"], e.references
        words = [w.strip(MT.PUNCT) for w in s.split()]
        assert e.prompt.startswith(f'Sentence: "{s}"\n') and all(words)
        if kind in ("first", "second", "last"):
            assert answer == words[{"first": 0, "second": 1, "last": -1}[kind]]
        else:
            (asked,) = re.findall(r'"([^"]+)" in the sentence', e.prompt)
            i = [w.lower() for w in words].index(asked.lower())
            assert [w.lower() for w in words].count(asked.lower()) == 1  # the question has one answer
            assert answer == words[i + 1 if kind == "after" else i - 1]
        assert MT.answer_key(answer) == answer.lower()


def test_answer_key_and_scoring():
    assert MT.answer_key(' "Hello." \nmore') == "hello"
    assert MT.answer_key("\n\n  don't!") == "don't"
    assert MT.answer_key("") == "" and MT.answer_key(None) == ""
    assert is_correct("short_answer", "You", "you") and is_correct("short_answer", "'you'", "you")
    assert not is_correct("short_answer", "The answer is you", "you")
    assert not is_correct("short_answer", "", "")  # an empty answer is never right
    assert is_correct("final_number", "so 1,200 in total", "... #### 1200")
    assert not is_correct("final_number", "#### 12", "#### 1200")
    task = MICRO_TASK.tasks[0]
    exs = [Example(f"x{i}", "q", [a], "t", {"kind": k}) for i, (a, k) in enumerate([("a", "first"), ("b", "first"),
                                                                                    ("c", "last")])]
    per, mets = score_decode(task, exs, ["A", "no", "c."])
    assert [p["accuracy"] for p in per] == [100.0, 0.0, 100.0]
    assert mets["accuracy"] == pytest.approx(200 / 3) and mets["accuracy_first"] == 50.0
    assert mets["accuracy_last"] == 100.0 and "rougeL" in mets


def test_finetune_is_cached_and_keyed_by_data(tmp_path, monkeypatch):
    from kdbench import finetune

    teacher, _ = make_tiny_pair(tmp_path / "models")
    monkeypatch.setattr(finetune, "cache_dir", lambda: tmp_path / "cache")
    train = MT.build_splits()["train"][:16]
    spec = TrainSpec(steps=2, batch_size=4, max_prompt_tokens=48, max_tokens=56, warmup_steps=1, log_every=1)
    import torch

    out = finetune.finetune_teacher(teacher, "micro-task", spec, train, torch.device("cpu"), progress=False)
    info = (out / "kdbench_finetune.json").read_text()
    assert out.parent == tmp_path / "cache" / "teachers" and '"n_train": 16' in info
    assert not list(out.parent.glob("*.tmp-*"))  # written atomically
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(torch.optim, "AdamW", None)  # a cache hit must not train again
    assert finetune.finetune_teacher(teacher, "micro-task", spec, train, torch.device("cpu"), progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    other = finetune.finetuned_path(teacher, "micro-task", spec, train[:15])
    assert other != out and finetune.finetuned_path(teacher, "micro-task", dataclasses.replace(spec, lr=2e-4),
                                                    train) != out


def test_finetune_is_deterministic_so_its_content_digest_is_reproducible(tmp_path, monkeypatch):
    """Reference rows are found by the fine-tuned teacher's content digest: two fine-tunes of the
    same (base, spec, data, seed) on one machine kind must give the same bytes."""
    import torch

    from kdbench import finetune
    from kdbench.models import model_digest

    teacher, _ = make_tiny_pair(tmp_path / "models")
    train = MT.build_splits()["train"][:16]
    spec = TrainSpec(steps=3, batch_size=4, max_prompt_tokens=48, max_tokens=56, warmup_steps=1, log_every=1)
    digests = []
    for attempt in ("first", "second"):
        monkeypatch.setattr(finetune, "cache_dir", lambda a=attempt: tmp_path / a)
        out = finetune.finetune_teacher(teacher, "micro-task", spec, train, torch.device("cpu"), progress=False)
        digests.append(model_digest(out))
    assert digests[0] == digests[1] and digests[0] != model_digest(teacher)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`kdbench run --suite micro-task` with the real teacher, budgets cut to the bone."""
    from kdbench import finetune
    from kdbench.cli import main

    tmp = tmp_path_factory.mktemp("micro_task")
    mp = pytest.MonkeyPatch()
    small = dataclasses.replace(
        MICRO_TASK, finetune=dataclasses.replace(MICRO_TASK.finetune, steps=1),
        tasks=(dataclasses.replace(MICRO_TASK.tasks[0], sample=False),),
        eval=dataclasses.replace(MICRO_TASK.eval, valid_every=1, n_valid=2))
    mp.setitem(suites.SUITES, "micro-task", small)
    mp.setattr(finetune, "cache_dir", lambda: tmp / "cache")
    db = tmp / "runs.db"
    try:
        rc = main(["run", "--suite", "micro-task", "--objective", "csd", "--steps", "2", "--eval-limit", "3",
                   "--db", str(db), "--no-save", "--no-progress"])
    finally:
        mp.undo()
    assert rc == 0
    return db


def test_tiny_run_records_accuracy_and_the_checkpoint_rule(tiny_run):
    runs = {r.role: r for r in rows(tiny_run, Run)}
    assert set(runs) == {"teacher", "student-init", "distilled"} and all(r.status == "finished" for r in runs.values())
    run = runs["distilled"]
    # the stored version is the spec's, with the overrides spelled out
    assert run.suite == "micro-task" and run.suite_version == f"{MICRO_TASK.version}+steps=2,eval_limit=3"
    assert run.config["suite"]["version"] == MICRO_TASK.version
    assert "/teachers/micro-task-" in run.config["teacher_path"]  # the fine-tuned teacher, not the base one
    # checkpoint selection by validation accuracy, greedy, every step; rule and step stored
    assert run.selection_rule.startswith("best validation accuracy (word-questions, greedy, 2 prompts) every 1 steps")
    valid = rows(tiny_run, CurvePoint, run_id=run.id, split="valid")
    assert [c.step for c in valid] == [1, 2] and all(0 <= c.terms["accuracy"] <= 100 for c in valid)
    assert run.selected_step == max(valid, key=lambda c: (c.terms["accuracy"], -c.step)).step
    for r in runs.values():
        acc = rows(tiny_run, Metric, run_id=r.id, metric="accuracy")
        assert len(acc) == 1 and acc[0].seed is None and 0.0 <= acc[0].value <= 100.0
        samples = rows(tiny_run, Sample, run_id=r.id)
        assert len(samples) == 3 and all(s.seed is None for s in samples)
        assert acc[0].value == pytest.approx(sum(s.scores["accuracy"] for s in samples) / 3)
