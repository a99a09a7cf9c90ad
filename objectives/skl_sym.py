"""Symmetric (weighted) KL: (1 − λ)·fkl + λ·rkl."""

from kdbench.numerics import kl_rows
from kdbench.registry import Param, objective


@objective(
    "skl_sym",
    behaviour="balanced",
    paper="weighted forward/reverse KL baseline, λ = 0.9 as in the Concrete Score Distillation code base "
    "(arXiv:2509.25837)",
    params=[Param("lam", float, 0.9, doc="weight λ of the reverse KL (0 = forward KL, 1 = reverse KL); "
                  "a convex weight: every λ in [0, 1] trains", min=0.0, max=1.0)],
)
def skl_sym(s, t, *, lam):
    """Symmetric KL: a λ-weighted mix of forward and reverse KL.

    SKL_λ(p, q) = (1 − λ)·KL(p‖q) + λ·KL(q‖p),   p = softmax(t), q = softmax(s)
    λ = 0 is forward KL, λ = 1 reverse KL, λ = 0.5 half of Jeffreys. terms: fkl, rkl.
    """
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    fkl, rkl = kl_rows(lp, lq), kl_rows(lq, lp)
    return (1.0 - lam) * fkl + lam * rkl, {"fkl": fkl, "rkl": rkl}
