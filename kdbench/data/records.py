"""What every loader shares: the :class:`Example` record, where the shared data lives, reading a
local file or a hub set into plain records, and the two prompt formats.

Part of :mod:`kdbench.data.loaders` (import from there; its docstring states the loader contract).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


class Records(list):
    """Records read from a local file, with where each came from: ``lines[i]`` is the 1-based line
    of record ``i`` (JSONL: its line; JSON array: where the array starts) and ``path`` the file."""

    def __init__(self, items=(), lines=(), path=None):
        super().__init__(items)
        self.lines = list(lines)
        self.path = path

    def where(self, i: int) -> str:
        line = self.lines[i] if 0 <= i < len(self.lines) else None
        return f"{self.path}:{line}" if line is not None else f"{self.path} record {i}"


def _read_local(path: Path) -> list[dict]:
    """Every record of a JSONL file or a JSON array (``{"data": [...]}`` containers too).

    Faults name the file and the line: a line that is not JSON, a record that is not an object,
    an empty file (no records at all)."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path} is empty (no records)")
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        if isinstance(data, dict):
            # {"data": [...]} / {"instances": [...]} containers
            for key in ("data", "instances", "examples"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        first_line = text[: len(text) - len(stripped)].count("\n") + 1
        records = Records(data, [None] * len(data), path)
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: record {i} (array from line {first_line}) is a "
                                 f"{type(rec).__name__}, not a JSON object")
    else:
        records = Records(path=path)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: a {type(rec).__name__}, not a JSON object")
            records.append(rec)
            records.lines.append(lineno)
    if not records:
        raise ValueError(f"{path} is empty (no records)")
    return records


def _read_records(path_or_name: str | os.PathLike, split: str, hub_kwargs: dict) -> tuple[list[dict], str]:
    """Records as plain dicts, and a source string for ``meta`` / error messages."""
    if _is_local(path_or_name) and not hub_kwargs:
        p = Path(path_or_name)
        return _read_local(p), str(p)
    import datasets

    ds = datasets.load_dataset(str(path_or_name), split=split, **hub_kwargs)
    return [dict(r) for r in ds], f"hub:{path_or_name}[{split}]"


def _require(rec: dict, keys: Iterable[str], source: str, i: int, records: list | None = None) -> None:
    """Every field in ``keys`` is present and not null; the error names the file, the line (when
    the records came from a local file) and the fields."""
    where = records.where(i) if isinstance(records, Records) else f"{source} record {i}"
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a {type(rec).__name__}, not a record (JSON object)")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}; has {sorted(rec)}")
    null = [k for k in keys if rec[k] is None]
    if null:
        raise ValueError(f"{where}: field(s) {', '.join(map(repr, null))} are null")


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

