"""kdbench.data.loaders on the real shared evaluation files (counts from their READMEs)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kdbench.data import loaders as L
from kdbench.metrics import extract_final_number

DATA = L.shared_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared evaluation data not found at {DATA} "
                                "(set KDBENCH_SHARED_DATA)")

MINILLM_FILES = {
    # task: (file, count, count with min_ref_words=11 (longest reference, whitespace words))
    "dolly": ("dolly/valid.jsonl", 500, 405),
    "dolly_dev": ("dolly/dev.jsonl", 1000, 789),
    "self_instruct": ("self_instruct/minillm/valid.jsonl", 242, 170),
    "sni": ("sni/minillm/valid.jsonl", 1694, 1224),
    "unni": ("unni/minillm/11_/valid.first20.jsonl", 20, 16),
}


def _check_examples(exs, task=None):
    assert exs
    assert len({e.id for e in exs}) == len(exs), "ids must be unique"
    for e in exs:
        assert isinstance(e, L.Example)
        assert e.prompt.strip() and e.prompt == e.prompt.strip()
        assert e.references and all(isinstance(r, str) and r.strip() for r in e.references)
        if task:
            assert e.task == task


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ MiniLLM schema


@needs_data
@pytest.mark.parametrize("task", sorted(MINILLM_FILES))
def test_minillm_files(task):
    rel, n, n11 = MINILLM_FILES[task]
    exs = L.load_minillm_jsonl(DATA / rel, task)
    assert len(exs) == n
    _check_examples(exs, task)
    raw = [json.loads(line) for line in open(DATA / rel, encoding="utf-8")]
    for e, r in zip(exs, raw):
        # the Alpaca-style prompt is exposed, and our template reproduces the file's exactly
        assert e.meta["alpaca_prompt"] == r["prompt"]
        assert L.alpaca_prompt(r["instruction"], r["input"]) == r["prompt"]
        assert e.references == (r["output"] if isinstance(r["output"], list) else [r["output"]])
    long = L.load_minillm_jsonl(DATA / rel, task, min_ref_words=11)
    assert len(long) == n11
    assert all(max(len(x.split()) for x in e.references) >= 11 for e in long)
    assert {e.id for e in long} <= {e.id for e in exs}  # ids survive filtering
    assert [e.id for e in L.load_minillm_jsonl(DATA / rel, task, limit=7)] == [e.id for e in exs[:7]]


@needs_data
def test_dolly_test_first_record_and_topics():
    exs = L.load_minillm_jsonl(DATA / "dolly/valid.jsonl", "dolly")
    first = exs[0]
    assert first.id == "dolly:0"
    assert first.prompt.startswith("When did Virgin Australia start operating?\n\nVirgin Australia, the trading name")
    assert first.references == ["Virgin Australia commenced services on 31 August 2000 as Virgin Blue, "
                                "with two aircraft on a single route."]
    assert first.meta["topic"] == "closed_qa"
    assert sum(1 for e in exs if not e.meta["input"]) == 409  # README: empty input for 409 of 500
    no_input = next(e for e in exs if not e.meta["input"])
    assert no_input.prompt == no_input.meta["instruction"].strip()


@needs_data
def test_sni_multi_reference_and_first_record():
    exs = L.load_minillm_jsonl(DATA / "sni/minillm/valid.jsonl", "sni")
    assert sum(1 for e in exs if len(e.references) == 1) == 1306  # README
    assert exs[0].meta["topic"] == "task1358_xlsum_title_generation"
    assert exs[0].prompt.startswith("In this task, you need to generate an appropriate title")
    assert exs[0].prompt.endswith("\n\nTeaching unions fear that services for some of the most vulnerable "
                                  "students will be among the first to go in education cuts in East Sussex.")
    tasks = set((DATA / "sni/test_tasks.txt").read_text().split())
    assert len(tasks) == 119 and {e.meta["topic"] for e in exs} <= tasks


# ------------------------------------------------------------------ Self-Instruct original


@needs_data
def test_self_instruct_user_oriented():
    exs = L.load_self_instruct_user_oriented(DATA / "self_instruct/user_oriented_instructions.jsonl")
    assert len(exs) == 252
    _check_examples(exs, "self_instruct")
    assert exs[0].id == "user_oriented_task_0" and exs[0].meta["motivation_app"] == "Grammarly"
    assert exs[0].prompt.startswith("The sentence you are given might be too wordy")
    assert exs[0].prompt.endswith("\n\nIf you have any questions about my rate or if you find it necessary "
                                  "to increase or decrease the scope for this project, please let me know.")
    # the MiniLLM version is the original minus 10 instructions (README)
    mini = L.load_minillm_jsonl(DATA / "self_instruct/minillm/valid.jsonl", "self_instruct")
    orig_pairs = {(e.meta["instruction"], e.meta["input"]): e.id for e in exs}
    matched = {orig_pairs[(m.meta["instruction"], m.meta["input"])] for m in mini}
    missing = sorted(int(i.rsplit("_", 1)[1]) for i in set(orig_pairs.values()) - matched)
    assert missing == [48, 56, 80, 91, 96, 98, 175, 179, 181, 213]


# ------------------------------------------------------------------ GSM8K


@needs_data
def test_gsm8k_local_files():
    test = L.load_gsm8k(DATA / "gsm8k/test.jsonl")
    train = L.load_gsm8k(str(DATA / "gsm8k/train.jsonl"))
    assert (len(test), len(train)) == (1319, 7473)
    _check_examples(test, "gsm8k")
    assert test[0].prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert test[0].meta["gold"] == "18" and test[0].references[0].endswith("#### 18")
    assert test[0].id == "gsm8k-test:0" and train[0].id == "gsm8k-train:0"
    assert all(e.meta["gold"] == extract_final_number(e.references[0]) for e in train)


@needs_data
def test_gsm8k_hub_code_paths(tmp_path, monkeypatch):
    import datasets

    rows = [json.loads(line) for line in open(DATA / "gsm8k/test.jsonl", encoding="utf-8")][:5]
    # 1) a datasets builder on a local file (the real load_dataset, offline)
    f = _write_jsonl(tmp_path / "g.jsonl", rows)
    exs = L.load_gsm8k("json", split="train", data_files=str(f), cache_dir=str(tmp_path / "hf"))
    assert [e.meta["gold"] for e in exs] == [extract_final_number(r["answer"]) for r in rows]
    # 2) a split name goes to the hub set openai/gsm8k, config main
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    exs = L.load_gsm8k("test")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert len(exs) == 5 and exs[0].id == "gsm8k-test:0" and exs[0].meta["gold"] == "18"


# ------------------------------------------------------------------ DialogSum


@needs_data
def test_dialogsum_dev_and_test():
    dev = L.load_dialogsum(DATA / "dialogsum/dialogsum.dev.jsonl", split="dev")
    test = L.load_dialogsum(DATA / "dialogsum/dialogsum.test.jsonl")
    assert (len(dev), len(test)) == (500, 500)
    _check_examples(dev, "dialogsum")
    _check_examples(test, "dialogsum")
    assert all(len(e.references) == 1 for e in dev)
    assert all(len(e.references) == 3 for e in test)
    assert dev[0].id == "dev_0" and test[0].id == "test_0"
    assert dev[0].prompt.startswith(L.DIALOGSUM_INSTRUCTION + "\n\n#Person1#: Hello, how are you doing today?")
    assert dev[0].references[0].startswith("#Person2# has trouble breathing.")
    assert dev[0].meta["topics"] == ["see a doctor"]
    assert len(test[0].meta["topics"]) == 3


def test_dialogsum_hub_layout_merges_rows(tmp_path):
    rows = [
        {"id": "test_0_1", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "greet"},
        {"id": "test_0_2", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "Two people say hi.",
         "topic": "greeting"},
        {"id": "test_1_1", "dialogue": "#Person1#: Bye.", "summary": "Person1 leaves.", "topic": "leave"},
    ]
    f = _write_jsonl(tmp_path / "hub_dialogsum.jsonl", rows)
    exs = L.load_dialogsum(f)
    assert [e.id for e in exs] == ["test_0_1", "test_1_1"]
    assert exs[0].references == ["They greet.", "Two people say hi."]
    assert exs[0].meta["topics"] == ["greet", "greeting"]


# ------------------------------------------------------------------ Multi30k


@needs_data
def test_multi30k_splits():
    d = DATA / "translation/multi30k"
    sizes = {s: len(L.load_multi30k(d, s)) for s in ("train", "val", "test_2016_flickr")}
    assert sizes == {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
    test = L.load_multi30k(d, "test")
    _check_examples(test, "multi30k")
    assert test[0].prompt == ("Translate the following English sentence into German.\n\n"
                              "A man in an orange hat starring at something.")
    assert test[0].references == ["Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."]
    rev = L.load_multi30k(d, "val", src="de", tgt="en", limit=3)
    assert len(rev) == 3 and rev[0].prompt.startswith("Translate the following German sentence into English.")
    assert rev[0].references == [L.load_multi30k(d, "val", limit=1)[0].meta["src"]]


def test_multi30k_line_mismatch_and_hub_columns(tmp_path):
    (tmp_path / "val.en").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "val.de").write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lines"):
        L.load_multi30k(tmp_path, "val")
    with pytest.raises(FileNotFoundError):
        L.load_multi30k(tmp_path, "train")
    f = _write_jsonl(tmp_path / "hub.jsonl", [{"en": "A dog runs.", "de": "Ein Hund rennt."}])
    exs = L.load_multi30k("json", "train", data_files=str(f), cache_dir=str(tmp_path / "hf"))
    assert exs[0].references == ["Ein Hund rennt."] and exs[0].prompt.endswith("\n\nA dog runs.")


# ------------------------------------------------------------------ AlpacaEval


@needs_data
def test_alpaca_eval():
    exs = L.load_alpaca_eval(DATA / "alpaca_eval/alpaca_eval.json")
    assert len(exs) == 805
    _check_examples(exs, "alpaca_eval")
    assert exs[0].prompt == "What are the names of some famous actors that started their careers on Broadway?"
    assert exs[0].meta["dataset"] == "helpful_base" and exs[0].meta["generator"] == "text_davinci_003"
    vic = L.load_alpaca_eval(DATA / "alpaca_eval/alpaca_eval.json", subset="vicuna")
    assert len(vic) == 80 and all(e.meta["dataset"] == "vicuna" for e in vic)


# ------------------------------------------------------------------ schemas with no real file here


def test_dolly_hf_schema(tmp_path, monkeypatch):
    # No file in the raw databricks-dolly-15k schema exists in the shared data (its Dolly files
    # are MiniLLM-processed), so this writes two records in that exact schema.
    rows = [
        {"instruction": "When did Virgin Australia start operating?",
         "context": "Virgin Australia ... commenced services on 31 August 2000 as Virgin Blue.",
         "response": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft "
                     "on a single route.", "category": "closed_qa"},
        {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope",
         "category": "classification"},
    ]
    f = _write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", rows)
    exs = L.load_dolly_hf(f)
    assert [e.id for e in exs] == ["dolly:0", "dolly:1"]
    assert exs[0].prompt == rows[0]["instruction"] + "\n\n" + rows[0]["context"]
    assert exs[1].prompt == rows[1]["instruction"] and exs[1].references == ["Tope"]
    assert exs[1].meta["category"] == "classification"
    assert exs[1].meta["alpaca_prompt"] == L.alpaca_prompt(rows[1]["instruction"])
    assert len(L.load_dolly_hf(f, min_ref_words=11)) == 1
    with pytest.raises(ValueError, match="missing field"):
        L.load_dolly_hf(_write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}]))
    # the default is the hub set
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: calls.append((a, k)) or datasets.Dataset.from_list(rows))
    assert len(L.load_dolly_hf()) == 2
    assert calls == [(("databricks/databricks-dolly-15k",), {"split": "train"})]


def test_vicuna_schema(tmp_path):
    # Vicuna-80 is not in the shared data: two records in its question.jsonl schema.
    rows = [
        {"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"},
        {"question_id": 2, "text": "What are the most effective ways to deal with stress?", "category": "generic",
         "reference": "Exercise, sleep and talking to someone."},
    ]
    exs = L.load_vicuna(_write_jsonl(tmp_path / "question.jsonl", rows))
    assert [e.id for e in exs] == ["vicuna:1", "vicuna:2"]
    assert exs[0].prompt == rows[0]["text"] and exs[0].references == []
    assert exs[1].references == ["Exercise, sleep and talking to someone."]
    assert exs[0].meta["category"] == "generic"


def test_json_array_and_bad_lines(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi there"}]), encoding="utf-8")
    assert L.load_minillm_jsonl(arr, "x")[0].references == ["hi there"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2"):
        L.load_minillm_jsonl(bad, "x")


def test_instruction_prompt_format():
    assert L.instruction_prompt(" Do X. ", "") == "Do X."
    assert L.instruction_prompt("Do X.", " the input \n") == "Do X.\n\nthe input"
    assert L.instruction_prompt("Do X.", None) == "Do X."


# ------------------------------------------------------------------ subsets / splits


def _fake(n: int) -> list[L.Example]:
    return [L.Example(id=f"t:{i}", prompt=f"p{i}", references=[f"r{i}"], task="t") for i in range(n)]


def test_sample_subset_deterministic():
    exs = _fake(50)
    a = L.sample_subset(exs, 10, seed=3)
    assert a == L.sample_subset(exs, 10, seed=3) and len(a) == 10
    assert [e.id for e in a] == sorted((e.id for e in a), key=lambda s: int(s.split(":")[1]))  # input order
    assert a != L.sample_subset(exs, 10, seed=4)
    assert L.sample_subset(exs, 100) == exs
    with pytest.raises(ValueError):
        L.sample_subset(exs, -1)


def test_split_train_valid_test_stable_under_reordering():
    exs = _fake(101)
    tr, va, te = L.split_train_valid_test(exs, (0.8, 0.1, 0.1), seed=0)
    assert (len(tr), len(va), len(te)) == (80, 10, 11)
    ids = [{e.id for e in part} for part in (tr, va, te)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    shuffled = exs[:]
    random.Random(7).shuffle(shuffled)
    again = L.split_train_valid_test(shuffled, (0.8, 0.1, 0.1), seed=0)
    assert [{e.id for e in part} for part in again] == ids
    assert [e.id for e in tr] == [e.id for e in exs if e.id in ids[0]]  # each part keeps input order
    other = L.split_train_valid_test(exs, (0.8, 0.1, 0.1), seed=1)
    assert {e.id for e in other[1]} != ids[1]
    with pytest.raises(ValueError):
        L.split_train_valid_test(exs, (0.5, 0.5))
    with pytest.raises(ValueError):
        L.split_train_valid_test(exs + exs[:1], (0.8, 0.1, 0.1))


def test_shared_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_SHARED_DATA", str(tmp_path))
    assert L.shared_data_dir() == tmp_path
    monkeypatch.delenv("KDBENCH_SHARED_DATA")
    assert L.shared_data_dir() == Path(L.__file__).resolve().parents[2].parent / "shared" / "data"
