"""Scoring one decode of one task: per-sample scores and the task's metrics (kdbench/metrics.py
holds the metric definitions; this module applies them per task kind).

* every kind: ``rougeL`` (REFERENCE §3: stemmed, max over references, mean × 100),
  ``mean_length`` (words), ``degenerate_frac``;
* "exact": ``accuracy`` -- the answer extracted by ``TaskSpec.answer`` equals the reference's
  (per sample 0 or 100, so the metric is their mean; ``final_number``: the number after the last ``####``, else the last number, compared as
  decimals -- GSM8K; ``short_answer``: first line, case-insensitive, surrounding quotes and
  punctuation removed -- micro-task); and ``accuracy_<kind>`` per question kind when the
  examples carry one (``meta["kind"]``);
* "translation": ``bleu`` and ``chrf`` -- sacrebleu corpus scores (BLEU: 13a tokenisation,
  4-grams, exp smoothing; chrF: character 6-grams, beta 2), against all references.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from kdbench import metrics as M


def _short_answer(text):
    from kdbench.data.micro_task import answer_key

    return answer_key(text)


# TaskSpec.answer -> extraction function (what is compared)
ANSWERS = {"final_number": M.extract_final_number, "short_answer": _short_answer}


def is_correct(answer: str, output: str, reference: str) -> bool:
    if answer == "final_number":
        return M.exact_match_number(output, reference) == 1.0
    if answer not in ANSWERS:
        raise ValueError(f"unknown answer extraction {answer!r}; known: {', '.join(sorted(ANSWERS))}")
    got = ANSWERS[answer](output)
    return bool(got) and got == ANSWERS[answer](reference)


def corpus_bleu_chrf(outputs: list[str], references: list[list[str]]) -> tuple[float, float]:
    import sacrebleu

    n = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(n)]  # repeats change nothing
    return (sacrebleu.corpus_bleu(outputs, streams).score, sacrebleu.corpus_chrf(outputs, streams).score)


def score_decode(task, examples, outputs: list[str]) -> tuple[list[dict], dict[str, float]]:
    """Per-sample score dicts (in example order) and the decode's metrics."""
    per = []
    for e, o in zip(examples, outputs):
        s = {"rougeL": M.rouge_l(o, list(e.references)), "length": M.response_length(o),
             "degenerate": float(M.is_degenerate(o))}
        if task.kind == "exact":
            s["accuracy"] = 100.0 * is_correct(task.answer, o, e.references[0])
        per.append(s)
    mets = {"rougeL": statistics.fmean(s["rougeL"] for s in per),
            "mean_length": statistics.fmean(s["length"] for s in per),
            "degenerate_frac": statistics.fmean(s["degenerate"] for s in per)}
    if task.kind == "exact":
        mets["accuracy"] = statistics.fmean(s["accuracy"] for s in per)
        by_kind = defaultdict(list)
        for e, s in zip(examples, per):
            if e.meta.get("kind"):
                by_kind[e.meta["kind"]].append(s["accuracy"])
        for kind, vals in sorted(by_kind.items()):
            mets[f"accuracy_{kind}"] = statistics.fmean(vals)
    if task.kind == "translation":
        mets["bleu"], mets["chrf"] = corpus_bleu_chrf(outputs, [list(e.references) for e in examples])
    return per, mets


def headline_score(task, examples, outputs: list[str]) -> float:
    """The number checkpoint selection maximises: the task's headline metric."""
    return score_decode(task, examples, outputs)[1][task.headline]
