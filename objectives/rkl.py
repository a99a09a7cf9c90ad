"""Reverse KL (MiniLLM)."""

from kdbench.numerics import kl_rows
from kdbench.registry import objective


@objective(
    "rkl",
    behaviour="mode-seeking",
    paper="Gu, Dong, Wei & Huang 2024, MiniLLM: Knowledge Distillation of Large Language Models, arXiv:2306.08543",
)
def rkl(s, t):
    """Reverse KL, KL(q ‖ p): the student concentrates on the teacher's main modes.

    KL(q‖p) = Σ_v q(v)·(log q(v) − log p(v)),   p = softmax(t), q = softmax(s)
    gradient w.r.t. s: q ⊙ (d − E_q[d]) with d = log q − log p (= s − t up to a constant).
    """
    return kl_rows(s.log_softmax(-1), t.log_softmax(-1))
