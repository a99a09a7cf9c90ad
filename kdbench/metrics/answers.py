"""Exact-answer accuracy: the final number of a GSM8K-style answer, and exact match on it.

Part of :mod:`kdbench.metrics` (import from there).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation


# ----------------------------------------------------------------------------------------------
# Exact-answer accuracy (GSM8K)
# ----------------------------------------------------------------------------------------------

# A number: optional sign (not after a letter/digit: "16-3" is 16 and 3), optional '$', digits with optional thousands commas, optional decimals;
# or a bare decimal like ".5".
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _normalise_number(raw: str) -> str | None:
    s = raw.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if s in ("", "-"):
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_final_number(text: str | None) -> str | None:
    """The final numeric answer in ``text``, normalised, or ``None`` when there is no number.

    Rule (GSM8K): if ``####`` occurs, the first number after the last ``####``; otherwise the
    last number in the text. Normalisation: thousands commas, ``$`` and a trailing ``.`` are
    removed; the value is printed without trailing zeros ("3.0" -> "3", "3.50" -> "3.5",
    "007" -> "7", "-0" -> "0"); a leading minus sign is kept.
    """
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        for m in _NUMBER_RE.finditer(tail):
            v = _normalise_number(m.group(0))
            if v is not None:
                return v
        return None
    last = None
    for m in _NUMBER_RE.finditer(text):
        v = _normalise_number(m.group(0))
        if v is not None:
            last = v
    return last


def exact_match_number(pred_text: str | None, gold_text: str) -> float:
    """1.0 when :func:`extract_final_number` of the prediction equals that of the gold, else 0.0.

    ``gold_text`` may be the full GSM8K answer (``... #### 18``) or just the number. A prediction
    with no number scores 0. Raises ``ValueError`` when the gold has no number.
    """
    gold = extract_final_number(gold_text)
    if gold is None:
        raise ValueError(f"gold answer has no number: {gold_text[-80:]!r}")
    pred = extract_final_number(pred_text)
    return 1.0 if pred is not None and Decimal(pred) == Decimal(gold) else 0.0
