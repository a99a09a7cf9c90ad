"""Forward KL (word-level KD)."""

from kdbench.numerics import kl_rows
from kdbench.registry import objective


@objective(
    "kl",
    behaviour="mode-covering",
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531; "
    "word-level KD for sequences: Kim & Rush 2016, arXiv:1606.07947",
)
def kl(s, t):
    """Forward KL from the teacher, KL(p ‖ q): the student must cover every teacher mode.

    KL(p‖q) = Σ_v p(v)·(log p(v) − log q(v)),   p = softmax(t), q = softmax(s)
    (the often-written −Σ p log q differs from it by the teacher entropy, a constant).
    """
    return kl_rows(t.log_softmax(-1), s.log_softmax(-1))
