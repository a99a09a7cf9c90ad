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

