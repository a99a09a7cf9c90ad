"""Loaders of the task-specific sets: GSM8K (math answers), DialogSum (summaries) and Multi30k
(translation).

Part of :mod:`kdbench.data.loaders` (import from there; its docstring states the loader contract).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdbench.data.records import Example, _is_local, _limit, _read_local, _read_records, _require


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
        _require(r, ("question", "answer"), source, i, records)
        gold = extract_final_number(r["answer"])
        if gold is None:
            where = records.where(i) if hasattr(records, "where") else f"{source} record {i}"
            raise ValueError(f"{where}: answer has no final number (#### N)")
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
        _require(r, ("dialogue",), source, i, records)
        if "summary1" in r:
            ks = sorted((k for k in r if k.startswith("summary") and k[7:].isdigit()), key=lambda k: int(k[7:]))
            refs = [r[k] for k in ks]
            topics = [r.get(f"topic{k[7:]}") for k in ks]
        else:
            _require(r, ("summary",), source, i, records)
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
        if not s_lines:
            raise ValueError(f"{ps} is empty (no sentences)")
        pairs, source, split_name = list(zip(s_lines, t_lines)), str(dir), fname
    else:
        records, source = _read_records(dir, split, hub_kwargs)
        pairs = []
        for i, r in enumerate(records):
            if "translation" in r:  # WMT-style {"translation": {"en": ..., "de": ...}}
                r = r["translation"]
            _require(r, (src, tgt), source, i, records)
            pairs.append((r[src], r[tgt]))
        split_name = split
    out = [
        Example(id=f"{task}-{split_name}:{i}", prompt=f"{head}\n\n{s.strip()}", references=[t.strip()], task=task,
                meta={"src": s.strip(), "src_lang": src, "tgt_lang": tgt, "source": source, "index": i})
        for i, (s, t) in enumerate(pairs)
    ]
    return _limit(out, limit)

