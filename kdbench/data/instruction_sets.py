"""Loaders of the instruction-following sets: MiniLLM's processed files (Dolly, Self-Instruct,
S-NI, UnNI), raw Dolly-15k, Vicuna-80, Self-Instruct user-oriented and AlpacaEval.

Part of :mod:`kdbench.data.loaders` (import from there; its docstring states the loader contract).
"""

from __future__ import annotations

import os
from typing import Any

from kdbench.data.records import (
    Example,
    _as_list,
    _limit,
    _n_words,
    _read_records,
    _require,
    alpaca_prompt,
    instruction_prompt,
)


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
        _require(r, ("instruction", "output"), source, i, records)
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
        _require(r, ("instruction", "context", "response"), source, i, records)
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
        _require(r, ("question_id", "text"), source, i, records)
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
        _require(r, ("id", "instruction", "instances"), source, i, records)
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
        _require(r, ("instruction",), source, i, records)
        if subset is not None and r.get("dataset") != subset:
            continue
        out.append(Example(
            id=f"{task}:{i}", prompt=r["instruction"].strip(), references=_as_list(r.get("output")), task=task,
            meta={"dataset": r.get("dataset"), "generator": r.get("generator"),
                  "alpaca_prompt": alpaca_prompt(r["instruction"].strip()), "source": source, "index": i},
        ))
    return _limit(out, limit)

