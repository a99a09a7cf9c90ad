"""Equivalence classes of settings whose gradients are parallel.

Two objectives whose gradients w.r.t. the student logits point the same way (CSD(S,S) at τ = 1 and
reverse KL: REFERENCE §1, gradient ×2) follow the same update direction under AdamW, which is invariant
to a constant gradient scale (REFERENCE §6): they differ at most by an effective learning-rate factor
(clipping makes it vary over training). The leaderboard must not present one as better than the other
unless the paired test separates them.

Source: the newest ``grad_similarity`` artifact of a finished analysis run of the suite
(:func:`kdbench.results.queries.grad_similarity`; ``kdbench analyze``). Two settings are *parallel*
when the cosine of their gradients is >= :data:`PARALLEL_COSINE`; classes are the connected components
of that relation (union-find), so a class can hold more than two settings. Setting names in the artifact
are canonical setting strings, the same as ``runs.setting``.
"""

from __future__ import annotations

import math
from typing import Iterable

from sqlalchemy.engine import Engine

from kdbench.results.queries import grad_similarity

PARALLEL_COSINE = 0.9999
ADAMW_NOTE = "under AdamW at most an effective learning-rate factor"


def _num(m, i: int, j: int):
    try:
        v = m[i][j]
    except (IndexError, TypeError):
        return None
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def pair_reason(a: str, b: str, ratio: float | None) -> str:
    """``a ∥ b: same direction, gradient ×2.00 — under AdamW at most an effective learning-rate factor``
    (``ratio`` = ‖g_a‖ / ‖g_b‖)."""
    scale = f", gradient ×{ratio:.2f}" if ratio is not None else ""
    return f"{a} ∥ {b}: same direction{scale} — {ADAMW_NOTE}"


def equivalence_classes(data: dict | None, settings: Iterable[str] | None = None,
                        threshold: float = PARALLEL_COSINE) -> list[dict]:
    """Classes of parallel settings in a grad_similarity artifact (``names``, ``cosine``, ``norm_ratio``,
    optional ``grad_norms``), restricted to ``settings`` when given (classes need two members present).

    Each class: ``label`` ('∥1', '∥2', … in order of first member), ``members`` (sorted by gradient norm,
    largest first, then name), ``pairs`` (a, b, cosine, ratio ‖g_a‖/‖g_b‖ >= 1: every parallel edge
    between members, larger gradient first), ``reason`` (the pair reasons joined by '; '), ``run_id``
    of the analysis."""
    if not data or not data.get("names"):
        return []
    names = [str(n) for n in data["names"]]
    keep = set(names) if settings is None else set(settings) & set(names)
    cos, ratio, norms = data.get("cosine") or [], data.get("norm_ratio") or [], data.get("grad_norms") or []
    parent = {n: n for n in names}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    edges = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j <= i or a not in keep or b not in keep:
                continue
            c = _num(cos, i, j)
            if c is None:
                c = _num(cos, j, i)
            if c is not None and c >= threshold:
                parent[find(a)] = find(b)
                r = _num(ratio, i, j)
                if r is None and i < len(norms) and j < len(norms) and norms[j]:
                    r = float(norms[i]) / float(norms[j])
                if r is not None and r < 1.0 and r > 0:
                    edges.append((b, a, c, 1.0 / r))
                else:
                    edges.append((a, b, c, r))
    groups: dict[str, list[str]] = {}
    for n in names:
        if n in keep:
            groups.setdefault(find(n), []).append(n)

    def norm_of(n: str) -> float:
        i = names.index(n)
        return float(norms[i]) if i < len(norms) and norms[i] is not None else 0.0

    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda n: (-norm_of(n), n))
        pairs = [e for e in edges if e[0] in members]
        out.append(dict(members=members, pairs=pairs, reason="; ".join(pair_reason(a, b, r) for a, b, _, r in pairs),
                        run_id=data.get("run_id")))
    out.sort(key=lambda c: names.index(min(c["members"], key=names.index)))
    for k, c in enumerate(out, 1):
        c["label"] = f"∥{k}"
    return out


def gradient_classes(engine: Engine, suite: str, settings: Iterable[str] | None = None,
                     threshold: float = PARALLEL_COSINE) -> list[dict]:
    """:func:`equivalence_classes` of the suite's newest grad_similarity artifact ([] without one)."""
    return equivalence_classes(grad_similarity(engine, suite), settings, threshold)


def class_of(classes: list[dict], setting: str) -> dict | None:
    for c in classes:
        if setting in c["members"]:
            return c
    return None
