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
        if kind == "S":  # s / 1.0 is s exactly: no [n, V] copy for the default τ
            cache[kind] = (s if tau == 1.0 else s / tau).softmax(-1)
        elif kind == "T":
            cache[kind] = t.softmax(-1)
        else:
            cache[kind] = alpha * _weights("T", s, t, tau, alpha, cache) + (1.0 - alpha) * _weights("S", s, t, tau, alpha, cache)
    return cache[kind]


def _scaled(w, c):
    """w ⊙ c row-wise; ``w`` None is the uniform weighting 1/V."""
    return c / c.shape[-1] if w is None else w * c


def _mean(w, d):
    return d.mean(-1) if w is None else (w * d).sum(-1)


def _var(w, c, wc):
    """Σ w c² as :func:`csd` computes it (``wc`` = w ⊙ c already made)."""
    return (c * c).mean(-1) if w is None else (wc * c).sum(-1)


def _minus_scaled(x, w, r):
    """x − w ⊙ r in place (``r`` [n, 1]; ``w`` None: the uniform weighting 1/V)."""
    return x.sub_(r / x.shape[-1]) if w is None else x.addcmul_(w, r, value=-1.0)


@torch.no_grad()
def csd_gradient(s, t, *, w1, w2, tau, alpha):
    """CSD's per-position values, terms and ∂(Σ values)/∂s in closed form (no autograd).

    With d centred and c_i = d − E_wi[d]: ∂L/∂s[k] = w2(k)·c1[k] + w1(k)·c2[k], and for
    w1 = w2 = w simply 2·w(k)·c[k]. The centring of d adds nothing: Σ_k ∂L/∂d[k] = 0.
    In float32 the weighted mean E_w[d] carries a rounding error δ, so c is off by δ; the
    residual r = Σ_k w(k)·c[k] (= −δ, exactly 0 in exact arithmetic) is subtracted again,
    as autograd's backward through E_w does (without it, at a student far from the teacher,
    the (S,S) gradient is 20× less accurate: 3.6e-5 against autograd's 2.0e-6, relative to
    float64). Values are made exactly as in :func:`csd` (same operations, same order). The
    training path uses this; the start-up check compares it with autograd on :func:`csd` for
    every run (kdbench/engine/check.py); benchmarks/bench_objectives.py times both.
    """
    # In place wherever a buffer is not read again (the same operations on the same values as
    # csd, so bitwise the same results): each [n, V] float32 buffer of a 256-row chunk is 50 MB,
    # and this is where a training step's memory peaks.
    d = s - t
    d.sub_(d.mean(-1, keepdim=True))
    cache: dict = {}
    a = _weights(w1, s, t, tau, alpha, cache)
    e1 = _mean(a, d)
    if w1 == w2:
        c1 = d.sub_(e1.unsqueeze(-1))  # d is not needed any more
        wc1 = _scaled(a, c1)
        v1 = c1.mul_(c1).mean(-1) if a is None else c1.mul_(wc1).sum(-1)  # = _var(a, c1, wc1); c1 is spent
        del c1, d
        grad = _minus_scaled(wc1, a, wc1.sum(-1, keepdim=True)).mul_(2.0)
        return v1, {"var_w1": v1, "var_w2": v1, "mean_gap_sq": torch.zeros_like(v1)}, grad
    c1 = d - e1.unsqueeze(-1)
    wc1 = _scaled(a, c1)
    v1 = _var(a, c1, wc1)
    r1 = wc1.sum(-1, keepdim=True)
    del wc1
    b = _weights(w2, s, t, tau, alpha, cache)
    e2 = _mean(b, d)
    c2 = d.sub_(e2.unsqueeze(-1))  # d is not needed any more
    bc2 = None if b is None else b * c2
    v2 = _var(b, c2, bc2)
    r2 = (c2.mean(-1) if b is None else bc2.sum(-1)).unsqueeze(-1)
    del bc2
    gap = (e1 - e2) ** 2
    # w2·(c1 − r2) + w1·(c2 − r1)
    grad = _scaled(b, c1.sub_(r2))
    c2.sub_(r1)
    grad = grad.add_(c2 / c2.shape[-1]) if a is None else grad.addcmul_(a, c2)
    return 0.5 * (v1 + v2 + gap), {"var_w1": v1, "var_w2": v2, "mean_gap_sq": gap}, grad


@objective(
    "csd",
    behaviour="mode-seeking",
    paper="Concrete Score Distillation (CSD), arXiv:2509.25837",
    params=[
        Param("w1", "choice", "S", choices=WEIGHTINGS, doc="first weighting: S student (stop-grad softmax(s/τ)), T teacher, U uniform, mix"),
        Param("w2", "choice", "S", choices=WEIGHTINGS, doc="second weighting (same choices)"),
        Param("tau", float, 1.0, doc="loss temperature τ, used only inside the S weighting (also within mix); "
              "[0.05, 100]: τ → 0 makes S a point mass on the student's argmax (and below ~1e-38 s/τ overflows: "
              "NaN at step 1), τ → ∞ makes S uniform (that is w=U)",
              min=0.05, max=100.0, active=lambda p: _uses(p, "S", "mix")),
        Param("alpha", float, 0.15, doc="teacher share α of mix = α·T + (1−α)·S; any α in [0, 1] is a "
              "distribution (1 is T)", min=0.0, max=1.0, active=lambda p: _uses(p, "mix")),
    ],
    aliases={
        "csd_ss": {"w1": "S", "w2": "S"},
        "csd_us": {"w1": "U", "w2": "S"},
        "csd_ts": {"w1": "T", "w2": "S"},
    },
    gradient=csd_gradient,
)
def csd(s, t, *, w1, w2, tau, alpha):
    """Concrete Score Distillation: match logit differences under two weightings (closed form).

    d = s − t (shift invariant; centred by its row mean first),  weights held constant:
    S = stop_gradient(softmax(s/τ)), T = softmax(t), U = 1/V, mix = α·T + (1−α)·S
    L = ½ Σ_y Σ_x w1(y)·w2(x)·(d[x] − d[y])²
      = ½ [ Var_w1(d) + Var_w2(d) + (E_w1[d] − E_w2[d])² ]      (w1 = w2 = w: L = Var_w(d))
    ∂L/∂s[k] = w2(k)·(d[k] − E_w1[d]) + w1(k)·(d[k] − E_w2[d])
    The value is the closed form itself (never a surrogate); the official CSD code's surrogate
    has half this gradient, for every weighting. Identity: for (S,S) the gradient is
    2τ² × the gradient of KL(softmax(s/τ) ‖ softmax(t/τ)) (tempered reverse KL; the official
    surrogate's is τ² ×, RKL's own at τ = 1), so CSD(S,S) and RKL differ in scale, not direction.
    Variants: csd_ss (S,S) mode-seeking, csd_us (U,S) balanced, csd_ts (T,S) mode-covering.
    terms: var_w1, var_w2, mean_gap_sq.
    """
    d = s - t
    d = d - d.mean(-1, keepdim=True)
    cache: dict = {}

    def moments(kind):  # the same helpers, in the same order, as csd_gradient: identical values
        w = _weights(kind, s, t, tau, alpha, cache)
        mean = _mean(w, d)
        c = d - mean.unsqueeze(-1)
        return mean, _var(w, c, None if w is None else w * c)

    e1, v1 = moments(w1)
    if w1 == w2:
        return v1, {"var_w1": v1, "var_w2": v1, "mean_gap_sq": torch.zeros_like(v1)}
    e2, v2 = moments(w2)
    gap = (e1 - e2) ** 2
    return 0.5 * (v1 + v2 + gap), {"var_w1": v1, "var_w2": v2, "mean_gap_sq": gap}
