"""Hinton KD: temperature-softened forward KL, scaled by τ²."""

from kdbench.numerics import kl_rows
from kdbench.registry import Param, objective


@objective(
    "hinton",
    behaviour="mode-covering",
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531",
    params=[Param("tau", float, 2.0, doc="softmax temperature τ of both teacher and student; [0.05, 100]: above "
                  "100 float32 rounding of the tempered log-probabilities swamps τ²·KL (relative error 2e-5 at "
                  "τ = 100, 2e-3 at 1000, negative values by 1e4); below 0.05 both softmaxes are one-hot for "
                  "logit gaps ≥ 1, τ² underflows float32 below ~1e-23 (loss 0) and t/τ overflows below ~1e-35 (NaN)",
                  min=0.05, max=100.0)],
)
def hinton(s, t, *, tau):
    """Hinton KD: forward KL between temperature-softened distributions, times τ².

    L = τ²·KL(p_τ ‖ q_τ),   p_τ = softmax(t/τ), q_τ = softmax(s/τ)
    (τ² keeps the gradient scale comparable across temperatures; τ = 1 is plain forward KL).
    """
    return tau * tau * kl_rows((t / tau).log_softmax(-1), (s / tau).log_softmax(-1))
