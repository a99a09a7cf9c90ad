"""The embedded ``micro`` data: real human-written instruction → response pairs from PyPI.

Source: the English part of ``chatterbot-corpus`` (BSD-3-Clause; the ChatterBot project's
hand-written dialog corpus: tech support, trivia, emotion, coding, AI, literature, ...),
installed by scripts/setup.sh with --no-deps and read from its YAML files (never imported
for anything else).

Construction (deterministic, documented in README "The micro suite"):
* every consecutive pair of turns (a, b) in a conversation is an instruction → response pair;
  a "conversation" that is not a list of turns is skipped (``trivia.yml`` holds one written
  as a plain string; read as turns it would give 22 one-character "prompts" such as
  ``'d' → 'u'``: docs/suites.md "micro v3");
* prompts are grouped by their normalised text (lower-case, collapsed whitespace); all
  distinct responses to the same prompt become that prompt's references (ROUGE-L takes the
  maximum over references), so no prompt appears in two splits;
* splits are assigned by a hash of the normalised prompt, so they do not depend on file
  order or on Python's hash seed. Training uses every reference of a training prompt as a
  separate example; validation and test prompts keep all their references.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import yaml

from kdbench.data.loaders import Example
from kdbench.errors import UserError

CORPUS_PACKAGE = "chatterbot-corpus"


def corpus_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(CORPUS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"data package {CORPUS_PACKAGE!r} is not installed; run `bash scripts/setup.sh`") from None
    path = Path(dist.locate_file("chatterbot_corpus/data/english"))
    if not path.is_dir():
        raise UserError(f"{CORPUS_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def read_pairs(directory: Path) -> dict[str, dict]:
    """Normalised prompt → {"prompt": first spelling seen, "refs": [distinct responses], "category"}."""
    grouped: dict[str, dict] = {}
    for f in sorted(directory.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        category = f.stem
        for conv in doc.get("conversations", []):
            if not isinstance(conv, list):  # a string here is not a conversation (see the module docstring)
                continue
            for a, b in zip(conv, conv[1:]):
                if not (isinstance(a, str) and isinstance(b, str)) or not a.strip() or not b.strip():
                    continue
                entry = grouped.setdefault(normalise(a), {"prompt": a.strip(), "refs": [], "category": category})
                b = " ".join(b.split())
                if b not in entry["refs"]:
                    entry["refs"].append(b)
    return grouped


def _bucket(key: str) -> float:
    """A number in [0, 1) fixed by the normalised prompt text."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def build_splits(valid_frac: float, test_frac: float, directory: Path | None = None) -> dict[str, list[Example]]:
    """Train / valid / test examples; train has one example per (prompt, reference)."""
    grouped = read_pairs(directory or corpus_dir())
    splits: dict[str, list[Example]] = {"train": [], "valid": [], "test": []}
    for key in sorted(grouped):
        entry = grouped[key]
        pid = hashlib.sha256(key.encode()).hexdigest()[:12]
        u = _bucket(key)
        split = "test" if u < test_frac else "valid" if u < test_frac + valid_frac else "train"
        meta = {"category": entry["category"]}
        if split == "train":
            for j, ref in enumerate(entry["refs"]):
                splits["train"].append(Example(f"{pid}-{j}", entry["prompt"], [ref], "micro/train", meta))
        else:
            splits[split].append(Example(pid, entry["prompt"], list(entry["refs"]), f"micro/{split}", meta))
    return splits
