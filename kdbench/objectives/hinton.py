"""Hinton KD: temperature-softened forward KL, scaled by τ²."""

from kdbench.numerics import kl_rows
from kdbench.registry import Param, objective


@objective(
    "hinton",
    behaviour="mode-covering",
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531",
    params=[Param("tau", float, 2.0, doc="softmax temperature τ of both teacher and student", min=0.0, min_exclusive=True)],
)
def hinton(s, t, *, tau):
    """Hinton KD: forward KL between temperature-softened distributions, times τ².

    L = τ²·KL(p_τ ‖ q_τ),   p_τ = softmax(t/τ), q_τ = softmax(s/τ)
    (τ² keeps the gradient scale comparable across temperatures; τ = 1 is plain forward KL).
    """
    return tau * tau * kl_rows((t / tau).log_softmax(-1), (s / tau).log_softmax(-1))
