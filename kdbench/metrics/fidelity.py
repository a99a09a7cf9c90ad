"""Token-level fidelity (torch, imported lazily): forward / reverse KL per position and the
mean log-likelihood of given tokens.

Part of :mod:`kdbench.metrics` (import from there).
"""

from __future__ import annotations


# ----------------------------------------------------------------------------------------------
# Token-level fidelity (torch)
# ----------------------------------------------------------------------------------------------


def _flat_positions(x, mask):
    import torch

    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if mask is None:
        return x2
    m = mask.reshape(-1).to(torch.bool)
    if m.shape[0] != x2.shape[0]:
        raise ValueError(f"mask has {m.shape[0]} positions, logits have {x2.shape[0]}")
    return x2[m]


def token_kl(student_logits, teacher_logits, mask=None, *, chunk_size: int = 1024,
             vocab_size: int | None = None) -> tuple[float, float]:
    """Mean per-position forward and reverse KL between teacher p and student q (nats).

    ``fkl = mean_pos sum_v p (log p - log q)``, ``rkl = mean_pos sum_v q (log q - log p)``, with
    p = softmax(teacher_logits), q = softmax(student_logits), untempered; the mean is over the
    positions where ``mask`` is true (all positions when ``mask`` is None). Logits are
    ``[..., V]``, the mask the leading shape. Computed in float32, ``chunk_size`` positions at a
    time, without gradient. Different vocabulary widths raise ``ValueError`` unless
    ``vocab_size`` is given, in which case both are sliced to their first ``vocab_size`` columns
    (padded heads). Returns ``(nan, nan)`` when no position is counted.
    """
    import torch

    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}; "
            "pass vocab_size= to compare the shared columns"
        )
    s = _flat_positions(student_logits, mask)
    t = _flat_positions(teacher_logits, mask)
    n = s.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    fkl = 0.0
    rkl = 0.0
    with torch.no_grad():
        for a in range(0, n, chunk_size):
            ls = torch.log_softmax(s[a : a + chunk_size].float(), dim=-1)
            lt = torch.log_softmax(t[a : a + chunk_size].float(), dim=-1)
            diff = lt - ls
            fkl += float((lt.exp() * diff).sum(dtype=torch.float64))
            rkl += float((ls.exp() * (-diff)).sum(dtype=torch.float64))
    return fkl / n, rkl / n


def mean_logprob(logits, labels, mask=None, *, chunk_size: int = 1024) -> float:
    """Mean log-probability (nats per token) of ``labels`` under ``softmax(logits)``.

    Alignment is the caller's: ``logits[..., t, :]`` must be the distribution for
    ``labels[..., t]`` (for a causal LM pass ``logits[:, :-1]`` and ``input_ids[:, 1:]``). The mean
    is over positions where ``mask`` is true (all when None); labels at masked-out positions may be
    anything (e.g. -100). float32, chunked, no gradient. ``nan`` when no position is counted.
    """
    import torch

    x = _flat_positions(logits, mask)
    y = labels.reshape(-1)
    if mask is not None:
        y = y[mask.reshape(-1).to(torch.bool)]
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} logit positions vs {y.shape[0]} labels")
    n = x.shape[0]
    if n == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for a in range(0, n, chunk_size):
            lp = torch.log_softmax(x[a : a + chunk_size].float(), dim=-1)
            total += float(lp.gather(-1, y[a : a + chunk_size].long().unsqueeze(-1)).sum(dtype=torch.float64))
    return total / n
