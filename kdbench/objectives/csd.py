"""Concrete Score Distillation (CSD), closed form."""

import torch

from kdbench.registry import Param, objective

WEIGHTINGS = ("S", "T", "U", "mix")


def _uses(params, *kinds):
    return params["w1"] in kinds or params["w2"] in kinds


@torch.no_grad()
def _weights(kind, s, t, tau, alpha, cache):
    """The weighting ``kind`` on rows of ``s`` / ``t`` (constant: no gradient), made once per call
    of :func:`csd` (``cache``); None for U (means instead of weighted sums). A module-level
    function, not a self-calling closure: such a closure is a reference cycle that keeps every
    chunk's ``[n, V]`` logits and weights alive until the garbage collector runs (measured:
    ~3 floats per vocabulary entry per position, held across all chunks)."""
    if kind == "U":
        return None
    if kind not in cache:
        if kind == "S":
            cache[kind] = (s / tau).softmax(-1)
        elif kind == "T":
            cache[kind] = t.softmax(-1)
        else:
            cache[kind] = alpha * _weights("T", s, t, tau, alpha, cache) + (1.0 - alpha) * _weights("S", s, t, tau, alpha, cache)
    return cache[kind]


@objective(
    "csd",
    behaviour="mode-seeking",
    paper="Concrete Score Distillation (CSD), arXiv:2509.25837",
    params=[
        Param("w1", "choice", "S", choices=WEIGHTINGS, doc="first weighting: S student (stop-grad softmax(s/τ)), T teacher, U uniform, mix"),
        Param("w2", "choice", "S", choices=WEIGHTINGS, doc="second weighting (same choices)"),
        Param("tau", float, 1.0, doc="loss temperature τ, used only inside the S weighting (also within mix)",
              min=0.0, min_exclusive=True, active=lambda p: _uses(p, "S", "mix")),
        Param("alpha", float, 0.15, doc="teacher share α of mix = α·T + (1−α)·S", min=0.0, max=1.0,
              active=lambda p: _uses(p, "mix")),
    ],
    aliases={
        "csd_ss": {"w1": "S", "w2": "S"},
        "csd_us": {"w1": "U", "w2": "S"},
        "csd_ts": {"w1": "T", "w2": "S"},
    },
)
def csd(s, t, *, w1, w2, tau, alpha):
    """Concrete Score Distillation: match logit differences under two weightings (closed form).

    d = s − t (shift invariant; centred by its row mean first),  weights held constant:
    S = stop_gradient(softmax(s/τ)), T = softmax(t), U = 1/V, mix = α·T + (1−α)·S
    L = ½ Σ_y Σ_x w1(y)·w2(x)·(d[x] − d[y])²
      = ½ [ Var_w1(d) + Var_w2(d) + (E_w1[d] − E_w2[d])² ]      (w1 = w2 = w: L = Var_w(d))
    ∂L/∂s[k] = w2(k)·(d[k] − E_w1[d]) + w1(k)·(d[k] − E_w2[d])
    The value is the closed form itself (never a surrogate). Identity: for (S,S) the gradient is
    2τ² × the gradient of KL(softmax(s/τ) ‖ softmax(t/τ)) (tempered reverse KL), so CSD(S,S)
    and RKL differ in scale, not direction. Variants: csd_ss (S,S) mode-seeking, csd_us (U,S)
    balanced, csd_ts (T,S) mode-covering. terms: var_w1, var_w2, mean_gap_sq.
    """
    d = s - t
    d = d - d.mean(-1, keepdim=True)
    cache: dict = {}

    def weights(kind):
        return _weights(kind, s, t, tau, alpha, cache)

    def moments(w):
        if w is None:
            mean = d.mean(-1)
            c = d - mean.unsqueeze(-1)
            return mean, (c * c).mean(-1)
        mean = (w * d).sum(-1)
        c = d - mean.unsqueeze(-1)
        return mean, (w * c * c).sum(-1)

    e1, v1 = moments(weights(w1))
    if w1 == w2:
        return v1, {"var_w1": v1, "var_w2": v1, "mean_gap_sq": torch.zeros_like(v1)}
    e2, v2 = moments(weights(w2))
    gap = (e1 - e2) ** 2
    return 0.5 * (v1 + v2 + gap), {"var_w1": v1, "var_w2": v2, "mean_gap_sq": gap}
