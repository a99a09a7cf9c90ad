"""Text metrics: ROUGE-L, Self-BLEU, distinct-n, response length and degeneration.

Part of :mod:`kdbench.metrics` (import from there); each definition is in its function's docstring.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np


# ----------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------

_ROUGE_SCORER = None


def _rouge_scorer():
    """The one ``RougeScorer(['rougeL'], use_stemmer=True)`` of this process (built lazily)."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Sentence ROUGE-L of one prediction, exactly as in the MiniLLM / CSD protocol.

    ``rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)`` (rouge-score 0.1.2:
    lower-cased, non-alphanumerics removed, Porter stemmer), F-measure of the prediction against
    each reference (``scorer.score(target=reference, prediction=prediction)``), **maximum over the
    references**, times 100. Range [0, 100]. An empty prediction scores 0.

    Raises ``ValueError`` when ``references`` is an empty list (there is nothing to score against).
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _rouge_scorer()
    best = 0.0
    for ref in refs:
        f = scorer.score(ref, prediction)["rougeL"].fmeasure
        if f > best:
            best = f
    return 100.0 * best


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of :func:`rouge_l` (each example: max over its references), x100.

    ``references[i]`` is one string or a list of strings for ``predictions[i]``. Raises
    ``ValueError`` on a length mismatch or an empty corpus.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference entries")
    if not predictions:
        raise ValueError("corpus_rouge_l of an empty corpus")
    return float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references)]))


# ----------------------------------------------------------------------------------------------
# Diversity: Self-BLEU and distinct-n
# ----------------------------------------------------------------------------------------------

#: The exact BLEU configuration of :func:`self_bleu` (sacrebleu's ``sentence_bleu`` defaults).
SELF_BLEU_CONFIG = {
    "implementation": "sacrebleu",
    "tokenize": "13a",
    "lowercase": False,
    "smooth_method": "exp",
    "effective_order": True,
    "max_ngram_order": 4,
    "scale": 100,
    "empty_texts": "excluded (tokenised length 0); NaN when fewer than 2 non-empty texts",
}

_TOKENIZERS: dict = {}


def _bleu_tokenize(text: str) -> list[str]:
    """sacrebleu's default '13a' tokenisation (the same preprocessing as ``sentence_bleu``)."""
    tok = _TOKENIZERS.get("13a")
    if tok is None:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        tok = _TOKENIZERS["13a"] = Tokenizer13a()
    return tok(text.rstrip()).split()


def _ngram_counts(tokens: list[str], max_n: int) -> Counter:
    c: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            c[tuple(tokens[i : i + n])] += 1
    return c


def _closest_len(hyp_len: int, ref_lens: np.ndarray) -> int:
    """sacrebleu's closest reference length (ties go to the shorter reference)."""
    diff = np.abs(ref_lens - hyp_len)
    best = diff.min()
    return int(ref_lens[diff == best].min())


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Self-BLEU of a set of texts, x100 (lower = more diverse).

    Definition: ``mean_i BLEU(texts[i], references = [texts[j] for j != i])``, where BLEU is
    sacrebleu 2.x **sentence BLEU with its defaults**: '13a' tokenisation, case-sensitive,
    n-gram orders 1..``max_n`` (4), geometric mean of clipped precisions with the 'exp' smoothing
    (NIST / Chen & Cherry method 3) and ``effective_order=True``; the clip count of an n-gram is its
    maximum count in any one of the other texts, the brevity penalty uses the closest other text's
    length (ties: the shorter). Computed from pre-extracted n-gram statistics in O(total n-grams)
    instead of n calls to ``sentence_bleu``; the values are identical (tested).

    Empty texts (tokenised length 0) are **excluded** both as hypotheses and as references: an
    empty output is a failure, not a diverse sample (report it with :func:`degenerate_fraction`).
    With fewer than 2 non-empty texts the value is undefined and ``nan`` is returned.

    Which samples are compared is the caller's choice; :func:`self_bleu_per_prompt` and
    :func:`self_bleu_across_prompts` are the two standard ones.
    """
    from sacrebleu.metrics.bleu import BLEU

    toks = [_bleu_tokenize(t) for t in texts if t is not None]
    toks = [t for t in toks if t]
    n_texts = len(toks)
    if n_texts < 2:
        return float("nan")
    counts = [_ngram_counts(t, max_n) for t in toks]
    lens = np.array([len(t) for t in toks], dtype=np.int64)
    # For each n-gram: the largest count and which text has it, and the second largest count,
    # so "max count over the other texts" is top1 unless text i holds top1 (then top2).
    top: dict[tuple, list] = {}
    for i, c in enumerate(counts):
        for g, k in c.items():
            entry = top.get(g)
            if entry is None:
                top[g] = [k, i, 0]
            elif k > entry[0]:
                entry[2] = entry[0]
                entry[0], entry[1] = k, i
            elif k > entry[2]:
                entry[2] = k
    scores = []
    for i, c in enumerate(counts):
        correct = [0] * max_n
        total = [0] * max_n
        for g, k in c.items():
            n = len(g) - 1
            total[n] += k
            t1, owner, t2 = top[g]
            ref_max = t2 if owner == i else t1
            if ref_max:
                correct[n] += min(k, ref_max)
        others = np.delete(lens, i)
        ref_len = _closest_len(int(lens[i]), others)
        score = BLEU.compute_bleu(
            correct, total, int(lens[i]), ref_len,
            smooth_method="exp", effective_order=True, max_ngram_order=max_n,
        ).score
        scores.append(score)
    return float(np.mean(scores))


def self_bleu_per_prompt(outputs_by_prompt: Mapping[Hashable, Sequence[str]], max_n: int = 4) -> float:
    """Mean over prompts of :func:`self_bleu` among one prompt's samples (e.g. across the 5 seeds).

    Measures how different the samples for the *same* prompt are. Prompts whose self-BLEU is
    undefined (fewer than 2 non-empty samples) are skipped; ``nan`` if every prompt is skipped.
    """
    vals = [self_bleu(list(v), max_n=max_n) for v in outputs_by_prompt.values()]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def self_bleu_across_prompts(
    outputs: Sequence[str], max_n: int = 4, max_texts: int | None = 1000, seed: int = 0
) -> float:
    """:func:`self_bleu` among the outputs of one seed across prompts (one output per prompt).

    Measures how templated a model's answers are across different prompts. Every output is a
    reference for every other, so the cost grows with the set size; when ``len(outputs) >
    max_texts`` a subsample of ``max_texts`` outputs is drawn first with
    ``random.Random(seed).sample`` (positions, without replacement) -- state ``max_texts`` and
    ``seed`` next to the number. ``max_texts=None`` uses every output.
    """
    outs = list(outputs)
    if max_texts is not None and len(outs) > max_texts:
        idx = sorted(random.Random(seed).sample(range(len(outs)), max_texts))
        outs = [outs[i] for i in idx]
    return self_bleu(outs, max_n=max_n)


def _words(text: str) -> list[str]:
    """Whitespace tokenisation of the lower-cased text (distinct-n, lengths, degeneration)."""
    return text.lower().split() if text else []


def distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n of a set of texts: (number of unique n-grams) / (total number of n-grams).

    Tokens: ``text.lower().split()`` (lower-case, whitespace). n-grams are taken inside each text
    (never across two texts) and pooled over the set. Range (0, 1]; higher = more diverse.
    A set with no n-gram at all (every text empty or shorter than n tokens) has distinct-n 0.0.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    seen: set = set()
    total = 0
    for t in texts:
        w = _words(t)
        for i in range(len(w) - n + 1):
            seen.add(tuple(w[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def distinct_n_per_prompt(outputs_by_prompt: Mapping[Hashable, Sequence[str]], n: int) -> float:
    """Mean over prompts of :func:`distinct_n` of one prompt's samples (e.g. across seeds)."""
    if not outputs_by_prompt:
        return float("nan")
    return float(np.mean([distinct_n(list(v), n) for v in outputs_by_prompt.values()]))


# ----------------------------------------------------------------------------------------------
# Length and degeneration
# ----------------------------------------------------------------------------------------------


def response_length(text: str | None) -> int:
    """Number of whitespace-separated tokens (``len(text.split())``); 0 for empty / None."""
    return len(text.split()) if text else 0


def repeated_ngram_ratio(text: str | None, n: int = 3) -> float:
    """1 - unique/total n-grams of one text (lower-cased whitespace tokens); 0.0 if no n-gram."""
    w = _words(text or "")
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


#: Degeneration rule parameters (see :func:`is_degenerate`).
DEGENERATE_N = 3
DEGENERATE_MIN_TOKENS = 8
DEGENERATE_THRESHOLD = 0.5


def is_degenerate(text: str | None) -> bool:
    """True for an empty / whitespace-only response or a highly repetitive one.

    Rule: tokens = ``text.lower().split()``; degenerate iff there are no tokens, or there are at
    least ``DEGENERATE_MIN_TOKENS`` (8) tokens and :func:`repeated_ngram_ratio` with n =
    ``DEGENERATE_N`` (3) is >= ``DEGENERATE_THRESHOLD`` (0.5), i.e. at least half of the trigram
    occurrences repeat an earlier trigram (a looping sample: "I am a I am a I am a ..."). Short
    responses (< 8 tokens) are never called repetitive. On the real references of Dolly test,
    Self-Instruct, S-NI and DialogSum fewer than 1% are flagged (tested); genuinely list-like
    references (e.g. 'No' repeated on 248 lines) are, by design, flagged too.
    """
    if text is None or not text.strip():
        return True
    w = _words(text)
    if len(w) < DEGENERATE_MIN_TOKENS:
        return False
    return repeated_ngram_ratio(text, DEGENERATE_N) >= DEGENERATE_THRESHOLD


def degenerate_fraction(texts: Sequence[str]) -> float:
    """Fraction of ``texts`` for which :func:`is_degenerate` holds (``nan`` for an empty list)."""
    if not texts:
        return float("nan")
    return float(np.mean([is_degenerate(t) for t in texts]))
