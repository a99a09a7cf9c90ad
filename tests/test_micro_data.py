"""The micro suite's data: real chatterbot-corpus pairs, a string "conversation" skipped, and
closed-book trivia scored apart from the open task (docs/suites.md "micro", v3)."""

from __future__ import annotations

import textwrap

from kdbench.data import micro
from kdbench.data.sources import build_micro
from kdbench.suites import get_suite


def test_a_conversation_written_as_a_string_is_skipped(tmp_path):
    # trivia.yml holds one such entry; read as a sequence it gave pairs of characters ('d' -> 'u')
    (tmp_path / "quiz.yml").write_text(textwrap.dedent("""\
        categories: [quiz]
        conversations:
        - - Which planet is red?
          - Mars
        - "In bingo, which number is two little ducks?"
        """), encoding="utf-8")
    pairs = micro.read_pairs(tmp_path)
    assert list(pairs) == ["which planet is red?"]
    assert pairs["which planet is red?"] == {"prompt": "Which planet is red?", "refs": ["Mars"], "category": "quiz"}


def test_the_installed_corpus_has_no_one_character_pairs():
    grouped = micro.read_pairs(micro.corpus_dir())
    # v2 read 22 one-character prompts from trivia.yml's string entry (a one-character answer, "E" to
    # "the most common letter in English?", is real)
    assert [k for k in grouped if len(k) == 1] == []
    assert 1000 < len(grouped) < 1100 and sum(v["category"] == "trivia" for v in grouped.values()) > 200


def test_micro_v3_splits_open_and_closed_book_prompts():
    data = build_micro(get_suite("micro"), None)
    test, closed = data.tests["test"], data.tests["closed_book"]
    assert {e.meta["category"] for e in closed} == {"trivia"}
    assert all(e.meta["category"] != "trivia" for e in test + data.valid)
    # training keeps every category: the student is distilled on trivia, scored on it apart
    assert any(e.meta["category"] == "trivia" for e in data.train)
    prompts = {split: {micro.normalise(e.prompt) for e in exs}
               for split, exs in (("train", data.train), ("valid", data.valid), ("test", test + closed))}
    assert not (prompts["train"] & prompts["valid"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["valid"] & prompts["test"])
    # the sizes docs/suites.md states (deterministic: a hash of the normalised prompt)
    assert (len(data.train), len(data.valid), len(test), len(closed)) == (793, 64, 193, 70)
    assert data.manifest["closed_book"] == ["trivia"]
