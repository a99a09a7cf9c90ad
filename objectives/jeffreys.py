"""Jeffreys divergence (forward + reverse KL)."""

from kdbench.numerics import kl_rows
from kdbench.registry import objective


@objective(
    "jeffreys",
    behaviour="balanced",
    paper="Jeffreys 1946, An invariant form for the prior probability in estimation problems, "
    "Proc. R. Soc. A 186:453; as a sequence-KD objective: Wen et al. 2023, f-Divergence Minimization "
    "for Sequence-Level Knowledge Distillation, arXiv:2307.15190",
)
def jeffreys(s, t):
    """Jeffreys divergence: forward plus reverse KL.

    J(p, q) = KL(p‖q) + KL(q‖p) = Σ_v (p − q)·(log p − log q),   p = softmax(t), q = softmax(s)
    terms: fkl = KL(p‖q), rkl = KL(q‖p).
    """
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    fkl, rkl = kl_rows(lp, lq), kl_rows(lq, lp)
    return fkl + rkl, {"fkl": fkl, "rkl": rkl}
