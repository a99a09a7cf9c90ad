"""Skew KL (DistiLLM)."""

from kdbench.numerics import scaled_kl_to_mixture
from kdbench.registry import Param, objective


@objective(
    "skl",
    behaviour="mode-covering",
    paper="Ko, Kim, Chen & Yun 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models, "
    "arXiv:2402.03898",
    params=[Param("alpha", float, 0.1, doc="skew α: share of the teacher in the mixture (0 → forward KL); "
                  "1 is excluded: the loss is identically 0 there, nothing to train", min=0.0, max=1.0,
                  max_exclusive=True)],
)
def skl(s, t, *, alpha):
    """Skew KL: forward KL against a teacher-skewed mixture of the two distributions.

    SKL_α(p, q) = KL(p ‖ α·p + (1−α)·q),   p = softmax(t), q = softmax(s)
    α = 0 is forward KL; the value goes continuously to 0 as α → 1.
    """
    gamma = 1.0 - alpha
    return gamma * scaled_kl_to_mixture(t.log_softmax(-1), s.log_softmax(-1), gamma)
