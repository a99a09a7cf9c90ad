"""kdbench.metrics: definitions checked against independent computations and hand values."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kdbench import metrics as M


def _shared_data() -> Path:
    env = os.environ.get("KDBENCH_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


DATA = _shared_data()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared evaluation data not found at {DATA} "
                                "(set KDBENCH_SHARED_DATA)")


def _jsonl(rel: str) -> list[dict]:
    with open(DATA / rel, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _perturb(text: str, k: int) -> str:
    """Deterministic perturbations of a reference: drop words, reverse, truncate, shuffle-ish."""
    w = text.split()
    if k == 0:
        return " ".join(x for i, x in enumerate(w) if i % 3 != 1)
    if k == 1:
        return " ".join(reversed(w))
    if k == 2:
        return " ".join(w[: max(1, len(w) // 2)])
    if k == 3:
        return " ".join(w[1::2] + w[0::2])
    return text.upper() + " extra words appended here"


# ------------------------------------------------------------------ ROUGE-L


def test_rouge_l_hand_checked_values():
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # LCS 2, precision 2/2, recall 2/6 -> F = 2PR/(P+R) = 0.5
    assert M.rouge_l("the cat", "the cat sat on the mat") == pytest.approx(50.0)
    # stemming and case folding: "Cats running" ~ "cat run"
    assert M.rouge_l("Cats running", "cat run") == pytest.approx(100.0)
    # LCS of "a b c d" and "a c b d" is 3 -> P = R = 3/4
    assert M.rouge_l("a b c d", "a c b d") == pytest.approx(75.0)
    assert M.rouge_l("", "anything at all") == 0.0
    # max over references
    assert M.rouge_l("the cat", ["dogs bark loudly", "the cat sat on the mat"]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        M.rouge_l("x", [])


@needs_data
def test_rouge_l_matches_rouge_score_on_dolly():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = [r["output"] for r in _jsonl("dolly/valid.jsonl")[:60]]
    preds, expect = [], []
    for i, ref in enumerate(refs):
        p = _perturb(ref, i % 5)
        preds.append(p)
        expect.append(100 * scorer.score(ref, p)["rougeL"].fmeasure)
        assert M.rouge_l(p, ref) == pytest.approx(expect[-1], abs=1e-9)
    assert M.corpus_rouge_l(preds, refs) == pytest.approx(float(np.mean(expect)), abs=1e-9)
    assert 0 < M.corpus_rouge_l(preds, refs) < 100


@needs_data
def test_rouge_l_max_over_sni_references():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    multi = [r for r in _jsonl("sni/minillm/valid.jsonl") if len(r["output"]) >= 2][:40]
    assert len(multi) == 40
    for i, r in enumerate(multi):
        refs = r["output"]
        pred = _perturb(refs[i % len(refs)], i % 5)
        expect = 100 * max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
        assert M.rouge_l(pred, refs) == pytest.approx(expect, abs=1e-9)
        assert M.rouge_l(pred, refs) >= M.rouge_l(pred, refs[0]) - 1e-12


def test_corpus_rouge_l_errors():
    with pytest.raises(ValueError):
        M.corpus_rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        M.corpus_rouge_l([], [])


# ------------------------------------------------------------------ Self-BLEU / distinct-n


def _self_bleu_reference(texts: list[str]) -> float:
    """The definition, literally: sacrebleu sentence_bleu of each text against all others."""
    from sacrebleu import sentence_bleu

    texts = [t for t in texts if t.split()]
    return float(np.mean([sentence_bleu(t, texts[:i] + texts[i + 1:]).score for i, t in enumerate(texts)]))


@needs_data
def test_self_bleu_equals_sacrebleu_definition_on_real_text():
    outs = [r["output"] for r in _jsonl("dolly/valid.jsonl")[:40]]
    assert M.self_bleu(outs) == pytest.approx(_self_bleu_reference(outs), abs=1e-9)
    # near-duplicates, very short texts (< 4 tokens) and repeated n-grams exercise clipping,
    # effective order and the closest-reference-length tie rule
    texts = outs[:10] + [_perturb(o, 0) for o in outs[:10]] + ["Yes.", "No", "Yes. Yes. Yes.", "the the the the"]
    assert M.self_bleu(texts) == pytest.approx(_self_bleu_reference(texts), abs=1e-9)


def test_self_bleu_hand_values_and_empty_texts():
    same = ["the quick brown fox jumps"] * 3
    assert M.self_bleu(same) == pytest.approx(100.0)
    assert M.self_bleu(["alpha beta gamma delta", "one two three four"]) == 0.0
    assert math.isnan(M.self_bleu(["only one text"]))
    assert math.isnan(M.self_bleu(["", "   ", "x y"]))  # < 2 non-empty
    # empty texts are excluded, not scored as maximally diverse
    assert M.self_bleu(["", "a b c d", "a b c d"]) == pytest.approx(100.0)
    texts = ["a cat sat on a mat", "a dog sat on a log", "a cat lay on a rug"]
    assert M.self_bleu(texts) == pytest.approx(_self_bleu_reference(texts), abs=1e-9)
    assert M.self_bleu(texts, max_n=2) > M.self_bleu(texts)  # fewer orders: fewer zero precisions
    assert M.SELF_BLEU_CONFIG["max_ngram_order"] == 4 and M.SELF_BLEU_CONFIG["tokenize"] == "13a"


def test_self_bleu_per_prompt_and_across_prompts():
    by_prompt = {
        "p1": ["the answer is four", "the answer is four", "the answer is 4"],
        "p2": ["paris is the capital", "it is paris", "paris"],
        "p3": ["", "lonely"],  # < 2 non-empty: skipped
    }
    expect = np.mean([M.self_bleu(by_prompt["p1"]), M.self_bleu(by_prompt["p2"])])
    assert M.self_bleu_per_prompt(by_prompt) == pytest.approx(expect)
    assert math.isnan(M.self_bleu_per_prompt({"a": ["x"]}))
    words = "the a cat dog sat ran on under mat log red big".split()
    outs = [" ".join(words[(i * k) % len(words)] for k in range(1, 3 + i % 5)) for i in range(30)]
    full = M.self_bleu(outs)
    assert M.self_bleu_across_prompts(outs, max_texts=None) == pytest.approx(full)
    assert M.self_bleu_across_prompts(outs, max_texts=30) == pytest.approx(full)
    a = M.self_bleu_across_prompts(outs, max_texts=10, seed=1)
    assert a == M.self_bleu_across_prompts(outs, max_texts=10, seed=1)  # deterministic
    # the documented subsample: random.Random(seed).sample over positions, kept in input order
    idx = sorted(random.Random(1).sample(range(30), 10))
    assert a == pytest.approx(M.self_bleu([outs[i] for i in idx]))


def test_distinct_n():
    texts = ["The cat sat", "the cat ran"]
    # unigrams: the, cat, sat, ran = 4 unique / 6 ; bigrams: (the cat),(cat sat),(cat ran) = 3/4
    assert M.distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert M.distinct_n(["a b", "c d"], 2) == 1.0  # n-grams never span two texts
    assert M.distinct_n(["", "   "], 1) == 0.0
    assert M.distinct_n(["one"], 2) == 0.0
    assert M.distinct_n([], 1) == 0.0
    by_prompt = {"p": ["a a", "a a"], "q": ["x y", "z w"]}
    assert M.distinct_n_per_prompt(by_prompt, 1) == pytest.approx((1 / 4 + 1.0) / 2)
    with pytest.raises(ValueError):
        M.distinct_n(texts, 0)


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### 1,080", "1080"),
        ("so the answer is $1,234.50.", "1234.5"),
        ("The total is 3.0", "3"),
        ("x = -5", "-5"),
        ("16-3=13 apples", "13"),
        ("first 12 then 7.", "7"),
        ("#### 42 (not 43)", "42"),
        ("no number here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_number(text, expected):
    assert M.extract_final_number(text) == expected


def test_exact_match_number():
    assert M.exact_match_number("The answer is 18.", "Janet ... #### 18") == 1.0
    assert M.exact_match_number("#### 18.00", "18") == 1.0
    assert M.exact_match_number("It is 17", "#### 18") == 0.0
    assert M.exact_match_number("", "#### 18") == 0.0
    assert M.exact_match_number(None, "#### 18") == 0.0
    with pytest.raises(ValueError):
        M.exact_match_number("18", "no gold number")


@needs_data
def test_gsm8k_gold_answers_all_parse():
    for split in ("test", "train"):
        rows = _jsonl(f"gsm8k/{split}.jsonl")
        for r in rows:
            raw = r["answer"].rsplit("####", 1)[1].strip()
            assert M.extract_final_number(r["answer"]) == raw.replace(",", "")
            assert M.exact_match_number(r["answer"], r["answer"]) == 1.0
            # a model restating the solution without the marker still scores via the last number
            assert M.exact_match_number(f"So the answer is {raw}.", r["answer"]) == 1.0


# ------------------------------------------------------------------ length / degeneration


def test_length_and_degenerate_rule():
    assert M.response_length("a  b\nc ") == 3
    assert M.response_length("") == 0 and M.response_length(None) == 0
    assert M.is_degenerate("") and M.is_degenerate("   \n") and M.is_degenerate(None)
    assert M.is_degenerate("I am a " * 10)
    assert M.is_degenerate("Sure! " + "the end " * 20)
    assert not M.is_degenerate("no no no")  # short answers are never called repetitive
    assert not M.is_degenerate("Virgin Australia commenced services on 31 August 2000 as Virgin Blue.")
    assert M.repeated_ngram_ratio("a b c a b c", 3) == pytest.approx(1 - 3 / 4)
    assert M.degenerate_fraction(["", "fine answer here", "x " * 30]) == pytest.approx(2 / 3)
    assert math.isnan(M.degenerate_fraction([]))


@needs_data
def test_degenerate_rule_rarely_fires_on_real_references():
    texts = [r["output"] for r in _jsonl("dolly/valid.jsonl")]
    texts += [r["output"] for r in _jsonl("self_instruct/minillm/valid.jsonl")]
    texts += [o for r in _jsonl("sni/minillm/valid.jsonl") for o in r["output"]]
    texts += [r["summary"] for r in _jsonl("dialogsum/dialogsum.dev.jsonl")]
    assert len(texts) > 3500
    assert M.degenerate_fraction(texts) < 0.01


# ------------------------------------------------------------------ token fidelity


def test_token_kl_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g)
    t = torch.randn(2, 5, 11, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    fkl, rkl = M.token_kl(s, t, mask, chunk_size=3)
    p, q = torch.softmax(t[mask].double(), -1), torch.softmax(s[mask].double(), -1)
    assert fkl == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-5)
    assert rkl == pytest.approx(float((q * (q.log() - p.log())).sum(-1).mean()), rel=1e-5)
    assert M.token_kl(s, t, mask, chunk_size=1000) == pytest.approx((fkl, rkl), rel=1e-6)
    assert M.token_kl(s + 3.0, t, mask) == pytest.approx((fkl, rkl), rel=1e-5)  # shift invariance
    assert M.token_kl(t, t) == pytest.approx((0.0, 0.0), abs=1e-6)
    assert all(math.isnan(x) for x in M.token_kl(s, t, torch.zeros(2, 5, dtype=torch.bool)))
    with pytest.raises(ValueError):
        M.token_kl(s, t[..., :10])
    padded = torch.cat([s, torch.full((2, 5, 3), -1e4)], -1)
    assert M.token_kl(padded, t, mask, vocab_size=11) == pytest.approx((fkl, rkl), rel=1e-6)
    assert M.token_kl(s.bfloat16(), t.bfloat16(), mask)[0] == pytest.approx(fkl, rel=0.05)


def test_mean_logprob():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    labels_masked = labels.masked_fill(~mask, -100)
    lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert M.mean_logprob(logits, labels_masked, mask, chunk_size=2) == pytest.approx(float(lp[mask].mean()), rel=1e-6)
    assert M.mean_logprob(logits, labels) == pytest.approx(float(lp.mean()), rel=1e-6)
    uniform = torch.zeros(1, 3, 8)
    assert M.mean_logprob(uniform, torch.tensor([[0, 3, 7]])) == pytest.approx(-math.log(8))


# ------------------------------------------------------------------ uncertainty


def test_bootstrap_ci_properties():
    rng = np.random.default_rng(0)
    scores = rng.normal(20.0, 8.0, size=(100, 5)) + rng.normal(0, 5, size=(100, 1))
    mean, lo, hi = M.bootstrap_ci(scores, n_boot=500, seed=0)
    assert mean == pytest.approx(scores.mean())
    assert lo < mean < hi
    assert M.bootstrap_ci(scores, n_boot=500, seed=0) == (mean, lo, hi)  # deterministic
    assert M.bootstrap_ci(scores, n_boot=500, seed=1) != (mean, lo, hi)
    # more prompts from the same distribution -> narrower interval
    more = rng.normal(20.0, 8.0, size=(1600, 5)) + rng.normal(0, 5, size=(1600, 1))
    _, lo2, hi2 = M.bootstrap_ci(more, n_boot=500, seed=0)
    assert (hi2 - lo2) < 0.5 * (hi - lo)
    # seed-aware: with complete rows, the bootstrap over [prompts, seeds] equals the bootstrap
    # of per-prompt means (prompts are resampled with their seeds kept together)
    assert M.bootstrap_ci(scores, n_boot=300, seed=3) == pytest.approx(
        M.bootstrap_ci(scores.mean(axis=1), n_boot=300, seed=3))
    # alpha: a 50% interval sits inside the 95% one
    _, lo50, hi50 = M.bootstrap_ci(scores, n_boot=500, alpha=0.5, seed=0)
    assert lo <= lo50 <= hi50 <= hi


def test_bootstrap_ci_missing_cells_and_edges():
    scores = np.array([[1.0, 3.0], [np.nan, 5.0], [np.nan, np.nan], [2.0, 2.0]])
    mean, lo, hi = M.bootstrap_ci(scores, n_boot=200, seed=0)
    assert mean == pytest.approx((1 + 3 + 5 + 2 + 2) / 5)  # mean over observed cells
    assert lo <= mean <= hi and np.isfinite([lo, hi]).all()
    assert M.bootstrap_ci([[4.0, 4.0]]) == (4.0, 4.0, 4.0)
    assert all(math.isnan(x) for x in M.bootstrap_ci(np.full((3, 2), np.nan)))
    with pytest.raises(ValueError):
        M.bootstrap_ci(np.zeros((2, 2, 2)))


def test_mean_std_and_t_interval():
    assert M.mean_std([2.0, 4.0, 6.0]) == pytest.approx((4.0, 2.0))  # ddof = 1
    assert M.mean_std([5.0]) == (5.0, 0.0)
    assert M.mean_std([1.0, np.nan, 3.0]) == pytest.approx((2.0, math.sqrt(2)))
    assert all(math.isnan(x) for x in M.mean_std([]))
    m, lo, hi = M.t_interval([1.0, 3.0])
    # t_{0.975, 1} = 12.7062; s = sqrt(2); half = 12.7062 * sqrt(2) / sqrt(2)
    assert m == 2.0 and hi - m == pytest.approx(12.7062047, rel=1e-6) and m - lo == pytest.approx(hi - m)
    vals = [24.1, 24.9, 25.3, 24.6, 25.0]
    m, lo, hi = M.t_interval(vals, alpha=0.05)
    half = 2.7764451 * np.std(vals, ddof=1) / math.sqrt(5)
    assert (lo, hi) == pytest.approx((m - half, m + half), rel=1e-6)
    m1, lo1, hi1 = M.t_interval([7.0])
    assert m1 == 7.0 and math.isnan(lo1) and math.isnan(hi1)
