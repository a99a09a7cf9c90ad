"""Loaders for the paper suites' evaluation / training sets, in their published schemas.

Every loader returns a list of :class:`Example` and takes either a **local file** (jsonl, or a JSON
array) in the schema below, or a **hub name** (anything that is not an existing path), which is
loaded with ``datasets.load_dataset(name, split=split, **hub_kwargs)``. ``hub_kwargs`` also lets a
test drive the hub code path on a local file: ``load_gsm8k("json", split="train",
data_files="x.jsonl")``. Nothing here touches the network by itself; with ``HF_HUB_OFFLINE=1`` a
hub name that is not cached fails fast.

Prompt format of the instruction sets (``Example.prompt``, the text to put in a chat template or
an Alpaca template): the instruction, then -- when the input is non-empty -- a blank line and the
input, i.e. ``instruction`` or ``f"{instruction}\\n\\n{input}"`` (both stripped of surrounding
whitespace). The MiniLLM Alpaca-style prompt (what MiniLLM / DistiLLM / CSD feed GPT-2) is kept in
``meta["alpaca_prompt"]`` (the file's ``prompt`` field, or :func:`alpaca_prompt` when absent).

The real files live in the read-only shared data folder (``shared_data_dir()``; see its README):
they are never copied into this repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Example",
    "shared_data_dir",
    "alpaca_prompt",
    "instruction_prompt",
    "load_minillm_jsonl",
    "load_dolly_hf",
    "load_vicuna",
    "load_self_instruct_user_oriented",
    "load_gsm8k",
    "load_dialogsum",
    "load_multi30k",
    "load_alpaca_eval",
    "sample_subset",
    "split_train_valid_test",
]


@dataclass
class Example:
    """One evaluation / training example.

    ``id``: unique within its set (the source's id when it has one, else ``"{task}:{line}"`` with
    the 0-based record index in the source file, counted before any filtering).
    ``prompt``: the instruction text (no chat or Alpaca template applied).
    ``references``: reference responses (ROUGE-L takes the max over them); empty only for sets
    that have none (original Vicuna questions).
    ``task``: set name, e.g. ``"dolly"``, ``"sni"``, ``"gsm8k"``.
    ``meta``: everything else (source fields, ``alpaca_prompt``, ``gold`` for GSM8K, ...).
    """

    id: str
    prompt: str
    references: list[str]
    task: str
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "references": list(self.references),
                "task": self.task, "meta": dict(self.meta)}


# ----------------------------------------------------------------------------------------------
# Where the shared data lives; reading records
# ----------------------------------------------------------------------------------------------


def shared_data_dir() -> Path:
    """``$KDBENCH_SHARED_DATA`` if set, else ``<repo>/../shared/data`` (may not exist)."""
    env = os.environ.get("KDBENCH_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _is_local(path_or_name: str | os.PathLike) -> bool:
    return Path(path_or_name).exists()


def _read_local(path: Path) -> list[dict]:
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the data file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        data = json.loads(text)
        if isinstance(data, dict):
            # {"data": [...]} / {"instances": [...]} containers
            for key in ("data", "instances", "examples"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    return records


def _read_records(path_or_name: str | os.PathLike, split: str, hub_kwargs: dict) -> tuple[list[dict], str]:
    """Records as plain dicts, and a source string for ``meta`` / error messages."""
    if _is_local(path_or_name) and not hub_kwargs:
        p = Path(path_or_name)
        return _read_local(p), str(p)
    import datasets

    ds = datasets.load_dataset(str(path_or_name), split=split, **hub_kwargs)
    return [dict(r) for r in ds], f"hub:{path_or_name}[{split}]"


def _require(rec: dict, keys: Iterable[str], source: str, i: int) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{source} record {i}: missing field(s) {missing}; has {sorted(rec)}")


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return [str(v) for v in x]


def _n_words(s: str) -> int:
    return len(s.split())


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[: max(0, int(limit))]


# ----------------------------------------------------------------------------------------------
# Prompt formats
# ----------------------------------------------------------------------------------------------

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """MiniLLM's Alpaca-style prompt (identical to the ``prompt`` field of the MiniLLM files)."""
    if input:
        return _ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return _ALPACA_NO_INPUT.format(instruction=instruction)


def instruction_prompt(instruction: str, input: str | None = "") -> str:
    """``instruction``, plus a blank line and ``input`` when the input is non-empty (both stripped)."""
    ins = (instruction or "").strip()
    inp = (input or "").strip()
    return f"{ins}\n\n{inp}" if inp else ins


# ----------------------------------------------------------------------------------------------
# Instruction-following sets
# ----------------------------------------------------------------------------------------------


def load_minillm_jsonl(
    path: str | os.PathLike,
    task: str,
    min_ref_words: int | None = None,
    limit: int | None = None,
    *,
    split: str = "train",
    **hub_kwargs: Any,
) -> list[Example]:
    """MiniLLM's processed schema: ``instruction``, ``input``, ``output`` (str or list), ``prompt``.

    Used for Dolly test (``dolly/valid.jsonl``, 500), Dolly dev (``dolly/dev.jsonl``), Self-Instruct
    (``self_instruct/minillm/valid.jsonl``, 242), S-NI (``sni/minillm/valid.jsonl``, 1,694) and
    UnNI (``unni/minillm/11_/valid.first20.jsonl``). ``references`` = ``output`` as a list.

    ``min_ref_words``: keep only examples whose **longest** reference has at least that many
    whitespace words (REFERENCE section 3's ">= 11" subsets). Note the MiniLLM S-NI / UnNI files
    are *already* MiniLLM's ">= 11" buckets, measured in tokenizer tokens, not words: loading
    them with ``min_ref_words=11`` drops further examples (S-NI: 1,694 -> 1,224). To reproduce the
    papers' sets load those files with ``min_ref_words=None``; use 11 on raw S-NI / UnNI data.

    ``limit`` keeps the first ``limit`` examples after filtering. ``meta``: ``alpaca_prompt``,
    ``instruction``, ``input``, ``source``, ``index`` and ``topic`` when present.
    """
    records, source = _read_records(path, split, hub_kwargs)
    out: list[Example] = []
    for i, r in enumerate(records):
        _require(r, ("instruction", "output"), source, i)
        refs = _as_list(r["output"])
        if min_ref_words is not None and (not refs or max(_n_words(x) for x in refs) < min_ref_words):
            continue
        inp = r.get("input") or ""
        meta = {
            "alpaca_prompt": r.get("prompt") or alpaca_prompt(r["instruction"], inp),
            "instruction": r["instruction"],
            "input": inp,
            "source": source,
            "index": i,
        }
        for k in ("topic", "category"):
            if k in r:
                meta[k] = r[k]
        out.append(Example(id=f"{task}:{i}", prompt=instruction_prompt(r["instruction"], inp),
                           references=refs, task=task, meta=meta))
    return _limit(out, limit)


def load_dolly_hf(
    path_or_name: str | os.PathLike = "databricks/databricks-dolly-15k",
    split: str = "train",
    task: str = "dolly",
    min_ref_words: int | None = None,
    limit: int | None = None,
    **hub_kwargs: Any,
) -> list[Example]:
    """The raw databricks-dolly-15k schema: ``instruction``, ``context``, ``response``, ``category``.

    The hub set has a single ``train`` split (15,011 records); the papers' train/valid/test splits
    are MiniLLM's processed files (load those with :func:`load_minillm_jsonl`). ``prompt`` =
    instruction [+ blank line + context]; ``references`` = [response]; ``meta``: ``category``,
    ``context``, ``alpaca_prompt``. No file of this schema is in the shared data (its Dolly files
    are MiniLLM-processed), so the tests use a small file written in this exact schema.
    """
    records, source = _read_records(path_or_name, split, hub_kwargs)
    out: list[Example] = []
    for i, r in enumerate(records):
        _require(r, ("instruction", "context", "response"), source, i)
        ref = r["response"]
        if min_ref_words is not None and _n_words(ref) < min_ref_words:
            continue
        ctx = r.get("context") or ""
        out.append(Example(
            id=f"{task}:{i}", prompt=instruction_prompt(r["instruction"], ctx), references=[ref], task=task,
            meta={"category": r.get("category"), "instruction": r["instruction"], "context": ctx,
                  "alpaca_prompt": alpaca_prompt(r["instruction"], ctx), "source": source, "index": i},
        ))
    return _limit(out, limit)


def load_vicuna(
    path_or_name: str | os.PathLike,
    split: str = "train",
    task: str = "vicuna",
    limit: int | None = None,
    **hub_kwargs: Any,
) -> list[Example]:
    """Vicuna-80 questions in their original schema: ``question_id``, ``text``, ``category``.

    Vicuna-80 is **not** in the shared data; this loader is tested on a small file in the same
    schema. The original question file has no reference answers, so ``references`` is empty
    unless the record carries one (``reference``, ``answer`` or ``output``: str or list). For the
    papers' Vicuna ROUGE-L (GPT-4 answers as references), MiniLLM's processed file is in the
    MiniLLM schema: load it with :func:`load_minillm_jsonl`.
    """
    records, source = _read_records(path_or_name, split, hub_kwargs)
    out: list[Example] = []
    for i, r in enumerate(records):
        _require(r, ("question_id", "text"), source, i)
        refs: list[str] = []
        for k in ("reference", "answer", "output"):
            if r.get(k):
                refs = _as_list(r[k])
                break
        out.append(Example(
            id=f"{task}:{r['question_id']}", prompt=r["text"].strip(), references=refs, task=task,
            meta={"question_id": r["question_id"], "category": r.get("category"),
                  "alpaca_prompt": alpaca_prompt(r["text"].strip()), "source": source, "index": i},
        ))
    return _limit(out, limit)


def load_self_instruct_user_oriented(
    path: str | os.PathLike,
    task: str = "self_instruct",
    min_ref_words: int | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Self-Instruct's original user-oriented set (252 instructions).

    Schema: ``id``, ``motivation_app``, ``instruction``, ``instances`` (list of ``{input,
    output}``). One :class:`Example` per instance: ``id`` is the record id (``:k`` appended for the
    k-th instance when a record has several; all 252 have exactly one). The papers evaluate on
    MiniLLM's 242-example version (``self_instruct/minillm/valid.jsonl``, via
    :func:`load_minillm_jsonl`).
    """
    records, source = _read_records(path, "train", {})
    out: list[Example] = []
    for i, r in enumerate(records):
        _require(r, ("id", "instruction", "instances"), source, i)
        insts = r["instances"]
        for k, inst in enumerate(insts):
            inp = inst.get("input") or ""
            ref = inst.get("output") or ""
            if min_ref_words is not None and _n_words(ref) < min_ref_words:
                continue
            ex_id = str(r["id"]) if len(insts) == 1 else f"{r['id']}:{k}"
            out.append(Example(
                id=ex_id, prompt=instruction_prompt(r["instruction"], inp), references=[ref], task=task,
                meta={"motivation_app": r.get("motivation_app"), "instruction": r["instruction"], "input": inp,
                      "alpaca_prompt": alpaca_prompt(r["instruction"], inp), "source": source, "index": i},
            ))
    return _limit(out, limit)


def load_alpaca_eval(
    path_or_name: str | os.PathLike,
    split: str = "eval",
    task: str = "alpaca_eval",
    limit: int | None = None,
    *,
    subset: str | None = None,
    **hub_kwargs: Any,
) -> list[Example]:
    """AlpacaEval v1 (805): a JSON array of ``dataset``, ``instruction``, ``output``, ``generator``.

    ``references`` = [``output``] (text-davinci-003's answer, the v1 baseline); ``meta``:
    ``dataset`` (source subset: ``selfinstruct`` 252, ``oasst`` 188, ``koala`` 156,
    ``helpful_base`` 129, ``vicuna`` 80), ``generator``. ``subset`` keeps one source subset; ids
    keep the position in the full file. ``subset="vicuna"`` gives the 80 Vicuna questions, but
    with text-davinci-003 references, not the GPT-4 answers MiniLLM's Vicuna set uses.
    """
    records, source = _read_records(path_or_name, split, hub_kwargs)
    out: list[Example] = []
    for i, r in enumerate(records):
        _require(r, ("instruction",), source, i)
        if subset is not None and r.get("dataset") != subset:
            continue
        out.append(Example(
            id=f"{task}:{i}", prompt=r["instruction"].strip(), references=_as_list(r.get("output")), task=task,
            meta={"dataset": r.get("dataset"), "generator": r.get("generator"),
                  "alpaca_prompt": alpaca_prompt(r["instruction"].strip()), "source": source, "index": i},
        ))
    return _limit(out, limit)


# ----------------------------------------------------------------------------------------------
# Task-specific sets
# ----------------------------------------------------------------------------------------------


def load_gsm8k(
    path_or_split: str | os.PathLike,
    task: str = "gsm8k",
    limit: int | None = None,
    *,
    hub_name: str = "openai/gsm8k",
    hub_config: str = "main",
    split: str | None = None,
    **hub_kwargs: Any,
) -> list[Example]:
    """GSM8K: ``question``, ``answer`` (worked solution ending in ``#### N``).

    ``path_or_split``: a local jsonl (``gsm8k/test.jsonl`` 1,319, ``gsm8k/train.jsonl`` 7,473), or
    a split name (``"train"``/``"test"``) of the hub set ``openai/gsm8k`` config ``main``, or -- with
    ``hub_kwargs`` -- a ``datasets`` builder name (``"json"``) with ``split``. ``prompt`` = the
    question; ``references`` = [full answer]; ``meta["gold"]`` = the final number
    (:func:`kdbench.metrics.extract_final_number`).
    """
    from kdbench.metrics import extract_final_number

    p = str(path_or_split)
    if _is_local(p) and not hub_kwargs:
        records, source = _read_local(Path(p)), p
        split_name = Path(p).stem
    elif hub_kwargs:
        split_name = split or "train"
        records, source = _read_records(p, split_name, hub_kwargs)
    else:
        import datasets

        split_name = split or p
        ds = datasets.load_dataset(hub_name, hub_config, split=split_name)
        records, source = [dict(r) for r in ds], f"hub:{hub_name}/{hub_config}[{split_name}]"
    out: list[Example] = []
    for i, r in enumerate(records):
        _require(r, ("question", "answer"), source, i)
        gold = extract_final_number(r["answer"])
        if gold is None:
            raise ValueError(f"{source} record {i}: answer has no final number")
        out.append(Example(id=f"{task}-{split_name}:{i}", prompt=r["question"].strip(), references=[r["answer"]],
                           task=task, meta={"gold": gold, "source": source, "index": i}))
    return _limit(out, limit)


DIALOGSUM_INSTRUCTION = "Summarize the following dialogue."


def load_dialogsum(
    path_or_name: str | os.PathLike,
    split: str = "test",
    task: str = "dialogsum",
    limit: int | None = None,
    *,
    instruction: str = DIALOGSUM_INSTRUCTION,
    **hub_kwargs: Any,
) -> list[Example]:
    """DialogSum in the original release format, or the hub copy ``knkarthick/dialogsum``.

    Original: ``fname``, ``dialogue``, ``summary``, ``topic`` (train/dev) or ``summary1..3`` /
    ``topic1..3`` (test: three references per dialogue). Hub copy: ``id``, ``dialogue``,
    ``summary``, ``topic`` with one row per reference; rows with the same dialogue text are merged
    into one example (references in row order; id = the first row's id). ``prompt`` =
    ``f"{instruction}\\n\\n{dialogue}"``; ``meta``: ``dialogue``, ``topics``, ``fname``.
    """
    records, source = _read_records(path_or_name, split, hub_kwargs)
    out: list[Example] = []
    by_dialogue: dict[str, Example] = {}
    for i, r in enumerate(records):
        _require(r, ("dialogue",), source, i)
        if "summary1" in r:
            ks = sorted((k for k in r if k.startswith("summary") and k[7:].isdigit()), key=lambda k: int(k[7:]))
            refs = [r[k] for k in ks]
            topics = [r.get(f"topic{k[7:]}") for k in ks]
        else:
            _require(r, ("summary",), source, i)
            refs, topics = [r["summary"]], [r.get("topic")]
        dialogue = r["dialogue"]
        prev = by_dialogue.get(dialogue)
        if prev is not None:  # hub layout: one row per reference
            prev.references.extend(refs)
            prev.meta["topics"].extend(topics)
            continue
        rid = r.get("fname") or r.get("id") or f"{task}:{i}"
        ex = Example(id=str(rid), prompt=f"{instruction}\n\n{dialogue.strip()}", references=list(refs), task=task,
                     meta={"dialogue": dialogue, "topics": list(topics), "fname": rid, "source": source, "index": i})
        by_dialogue[dialogue] = ex
        out.append(ex)
    return _limit(out, limit)


_MULTI30K_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                    "test": "test_2016_flickr", "test_2016_flickr": "test_2016_flickr"}
_LANG_NAMES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech"}
MULTI30K_INSTRUCTION = "Translate the following {src_name} sentence into {tgt_name}."


def load_multi30k(
    dir: str | os.PathLike,
    split: str,
    src: str = "en",
    tgt: str = "de",
    task: str = "multi30k",
    limit: int | None = None,
    *,
    instruction: str = MULTI30K_INSTRUCTION,
    **hub_kwargs: Any,
) -> list[Example]:
    """Multi30k task 1 from parallel line files ``{dir}/{split}.{src}`` / ``{dir}/{split}.{tgt}``.

    ``split``: ``train`` (29,000), ``val`` (alias ``valid``/``validation``/``dev``; 1,014),
    ``test_2016_flickr`` (alias ``test``; 1,000). Line i of one file translates line i of the other
    (a line-count mismatch raises). ``prompt`` = ``instruction`` (languages filled in), a blank
    line, the source sentence; ``references`` = [target sentence]. When ``dir`` is not a local
    folder it is a hub name with one column per language (e.g. ``bentrevett/multi30k``: ``en``,
    ``de``; splits ``train``/``validation``/``test``).
    """
    head = instruction.format(src_name=_LANG_NAMES.get(src, src), tgt_name=_LANG_NAMES.get(tgt, tgt))
    if Path(dir).is_dir() and not hub_kwargs:
        fname = _MULTI30K_SPLITS.get(split, split)
        ps, pt = Path(dir) / f"{fname}.{src}", Path(dir) / f"{fname}.{tgt}"
        for p in (ps, pt):
            if not p.exists():
                raise FileNotFoundError(f"{p} not found (splits: train, val, test_2016_flickr)")
        s_lines = ps.read_text(encoding="utf-8").split("\n")
        t_lines = pt.read_text(encoding="utf-8").split("\n")
        if s_lines and s_lines[-1] == "":
            s_lines.pop()
        if t_lines and t_lines[-1] == "":
            t_lines.pop()
        if len(s_lines) != len(t_lines):
            raise ValueError(f"{ps} has {len(s_lines)} lines but {pt} has {len(t_lines)}")
        pairs, source, split_name = list(zip(s_lines, t_lines)), str(dir), fname
    else:
        records, source = _read_records(dir, split, hub_kwargs)
        pairs = []
        for i, r in enumerate(records):
            if "translation" in r:  # WMT-style {"translation": {"en": ..., "de": ...}}
                r = r["translation"]
            _require(r, (src, tgt), source, i)
            pairs.append((r[src], r[tgt]))
        split_name = split
    out = [
        Example(id=f"{task}-{split_name}:{i}", prompt=f"{head}\n\n{s.strip()}", references=[t.strip()], task=task,
                meta={"src": s.strip(), "src_lang": src, "tgt_lang": tgt, "source": source, "index": i})
        for i, (s, t) in enumerate(pairs)
    ]
    return _limit(out, limit)


# ----------------------------------------------------------------------------------------------
# Subsets and splits
# ----------------------------------------------------------------------------------------------


def sample_subset(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``n`` examples drawn without replacement with ``random.Random(seed)``, in their input order.

    All examples (a copy of the list) when ``n >= len(examples)``. Deterministic for a given input
    order and seed.
    """
    items = list(examples)
    if n < 0:
        raise ValueError("n must be >= 0")
    if n >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def _id_key(ex_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{ex_id}".encode("utf-8")).digest()


def split_train_valid_test(
    examples: Sequence[Example], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic split by hashing ids: ``(train, valid, test)``.

    Examples are ordered by ``sha256(f"{seed}\\0{id}")``; the first ``floor(f_train * n)`` go to
    train, the next ``floor(f_valid * n)`` to valid, the rest to test (so sizes are exact and
    test absorbs rounding). Each part keeps the input order. The assignment depends only on the
    set of ids and the seed -- not on the input order. ``fractions`` must be three non-negative
    numbers summing to 1; duplicate ids raise ``ValueError``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {tuple(fractions)}")
    items = list(examples)
    ids = [e.id for e in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate example ids; splitting by id needs unique ids")
    n = len(items)
    n_train = int(fractions[0] * n + 1e-9)
    n_valid = int(fractions[1] * n + 1e-9)
    order = sorted(range(n), key=lambda i: _id_key(ids[i], seed))
    part = {}
    for rank, i in enumerate(order):
        part[i] = 0 if rank < n_train else (1 if rank < n_train + n_valid else 2)
    splits: tuple[list, list, list] = ([], [], [])
    for i, e in enumerate(items):
        splits[part[i]].append(e)
    return splits
