"""Evaluation metrics for kdbench (pure functions; numpy / python, torch only for token fidelity).

Every definition used on the leaderboard is written down here, in the docstring of the function
that computes it, so a number can be traced to one formula:

* ROUGE-L          -- REFERENCE.md section 3 (``rouge_score``, stemming, max over references, x100).
* Self-BLEU        -- sacrebleu sentence BLEU of each sample against the other samples, x100.
* distinct-n       -- unique n-grams / total n-grams over a set of samples.
* GSM8K accuracy   -- exact match of the final number (after ``####`` if present, else the last one).
* degeneration     -- empty, or a repeated-trigram ratio >= 0.5 on >= 8 tokens (see ``is_degenerate``).
* token fidelity   -- forward / reverse KL per position, teacher mean log-likelihood.
* uncertainty      -- seed-aware prompt bootstrap, mean +- sample std, Student-t interval.
"""

from __future__ import annotations

# The definitions live in one module per family; every public name is re-exported here, so
# ``from kdbench import metrics as M; M.rouge_l`` and ``from kdbench.metrics import X`` keep working.
from kdbench.metrics.answers import exact_match_number, extract_final_number
from kdbench.metrics.fidelity import mean_logprob, token_kl
from kdbench.metrics.stats import bootstrap_ci, mean_std, t_interval
from kdbench.metrics.text import (
    DEGENERATE_MIN_TOKENS as DEGENERATE_MIN_TOKENS,  # re-exported: the degeneration rule's constants
    DEGENERATE_N as DEGENERATE_N,  # re-exported: the degeneration rule's constants
    DEGENERATE_THRESHOLD as DEGENERATE_THRESHOLD,  # re-exported: the degeneration rule's constants
    SELF_BLEU_CONFIG,
    corpus_rouge_l,
    degenerate_fraction,
    distinct_n,
    distinct_n_per_prompt,
    is_degenerate,
    repeated_ngram_ratio,
    response_length,
    rouge_l,
    self_bleu,
    self_bleu_across_prompts,
    self_bleu_per_prompt,
)

__all__ = [
    "rouge_l",
    "corpus_rouge_l",
    "self_bleu",
    "self_bleu_per_prompt",
    "self_bleu_across_prompts",
    "SELF_BLEU_CONFIG",
    "distinct_n",
    "distinct_n_per_prompt",
    "extract_final_number",
    "exact_match_number",
    "response_length",
    "repeated_ngram_ratio",
    "is_degenerate",
    "degenerate_fraction",
    "token_kl",
    "mean_logprob",
    "bootstrap_ci",
    "mean_std",
    "t_interval",
]
