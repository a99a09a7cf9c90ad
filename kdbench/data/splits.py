"""Deterministic subsets and train/valid/test splits of a list of :class:`Example`.

Part of :mod:`kdbench.data.loaders` (import from there).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from kdbench.data.records import Example


# ----------------------------------------------------------------------------------------------
# Subsets and splits
# ----------------------------------------------------------------------------------------------


def sample_subset(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``n`` examples drawn without replacement with ``random.Random(seed)``, in their input order.

    All examples (a copy of the list) when ``n >= len(examples)``. Deterministic for a given input
    order and seed.
    """
    items = list(examples)
    if n < 0:
        raise ValueError("n must be >= 0")
    if n >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def _id_key(ex_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{ex_id}".encode("utf-8")).digest()


def split_train_valid_test(
    examples: Sequence[Example], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic split by hashing ids: ``(train, valid, test)``.

    Examples are ordered by ``sha256(f"{seed}\\0{id}")``; the first ``floor(f_train * n)`` go to
    train, the next ``floor(f_valid * n)`` to valid, the rest to test (so sizes are exact and
    test absorbs rounding). Each part keeps the input order. The assignment depends only on the
    set of ids and the seed -- not on the input order. ``fractions`` must be three non-negative
    numbers summing to 1; duplicate ids raise ``ValueError``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {tuple(fractions)}")
    items = list(examples)
    ids = [e.id for e in items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate example ids; splitting by id needs unique ids")
    n = len(items)
    n_train = int(fractions[0] * n + 1e-9)
    n_valid = int(fractions[1] * n + 1e-9)
    order = sorted(range(n), key=lambda i: _id_key(ids[i], seed))
    part = {}
    for rank, i in enumerate(order):
        part[i] = 0 if rank < n_train else (1 if rank < n_train + n_valid else 2)
    splits: tuple[list, list, list] = ([], [], [])
    for i, e in enumerate(items):
        splits[part[i]].append(e)
    return splits
