"""Skew reverse KL (DistiLLM)."""

from kdbench.numerics import scaled_kl_to_mixture
from kdbench.registry import Param, objective


@objective(
    "srkl",
    behaviour="mode-seeking",
    paper="Ko, Kim, Chen & Yun 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models, "
    "arXiv:2402.03898",
    params=[Param("alpha", float, 0.1, doc="skew α: share of the student in the mixture (0 → reverse KL); "
                  "1 is excluded: the loss is identically 0 there, nothing to train", min=0.0, max=1.0,
                  max_exclusive=True)],
)
def srkl(s, t, *, alpha):
    """Skew reverse KL: reverse KL against a student-skewed mixture of the two distributions.

    SRKL_α(p, q) = KL(q ‖ (1−α)·p + α·q),   p = softmax(t), q = softmax(s)
    α = 0 is reverse KL; the value goes continuously to 0 as α → 1.
    """
    gamma = 1.0 - alpha
    return gamma * scaled_kl_to_mixture(s.log_softmax(-1), t.log_softmax(-1), gamma)
