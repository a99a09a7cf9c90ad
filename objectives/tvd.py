"""Total variation distance."""

from kdbench.registry import objective


@objective(
    "tvd",
    behaviour="balanced",
    paper="Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation, arXiv:2307.15190",
)
def tvd(s, t):
    """Total variation distance between teacher and student distributions (bounded by 1).

    TVD(p, q) = ½ Σ_v |p(v) − q(v)|,   p = softmax(t), q = softmax(s)
    """
    return 0.5 * (t.softmax(-1) - s.softmax(-1)).abs().sum(-1)
