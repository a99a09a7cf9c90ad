"""Scales against the implementations the objectives cite (docs/objectives.md "Scales against
the cited implementations"): every factor stated there is pinned here, in float64, on random
logits, for several weightings and parameters.

The reference side is written from ../shared/REFERENCE.md's text, not from kdbench's code:

* the official CSD code optimises a surrogate whose gradient is half of ∂L/∂s (REFERENCE §1:
  "its gradient is half of the one above"), the weights held constant. REFERENCE gives it by its
  gradient, so it is re-implemented two ways with that gradient: as the stop-gradient product
  Σ_k sg(½·[w2(k)(d[k] − E_w1 d) + w1(k)(d[k] − E_w2 d)])·s[k], and as the pairwise
  ¼·Σ_y Σ_x w1(y) w2(x) (d[x] − d[y])² (half of L); both give the same gradient;
* the baselines' formulas are REFERENCE §2's table, written out with ``log_softmax``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdbench.registry import get_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest

N, V = 6, 13
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64 on both sides: agreement to rounding
# jsd, skl, srkl share kdbench.numerics.scaled_kl_to_mixture, whose 12-term series near x = 0 is
# exact to a relative 1e-8 (ample for float32, the training dtype): the bound in float64
SERIES = dict(rtol=1e-8, atol=1e-12)


def logits(seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    return s, t


def kdbench_grad(name: str, s: torch.Tensor, t: torch.Tensor, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position values, ∂Σ values/∂s) of kdbench's objective by autograd on its function."""
    obj = get_objective(name, **params)
    leaf = s.clone().requires_grad_(True)
    per_row, _ = obj.per_position(leaf, t)
    (grad,) = torch.autograd.grad(per_row.sum(), leaf)
    return per_row.detach(), grad


def autograd(fn, s: torch.Tensor) -> torch.Tensor:
    leaf = s.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return grad


def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """The least-squares factor a ≈ ratio · b."""
    return float((a * b).sum() / (b * b).sum())


# ------------------------------------------------------------------------------- CSD vs official


def weighting(kind: str, s, t, tau: float, alpha: float) -> torch.Tensor:
    """REFERENCE §1's weightings, constant (no gradient)."""
    s, t = s.detach(), t.detach()
    if kind == "S":
        return (s / tau).softmax(-1)
    if kind == "T":
        return t.softmax(-1)
    if kind == "U":
        return torch.full_like(s, 1.0 / s.shape[-1])
    return alpha * t.softmax(-1) + (1 - alpha) * (s / tau).softmax(-1)


def official_surrogate(s, t, w1, w2, tau, alpha):
    """Per position: the stop-gradient surrogate with half of REFERENCE §1's gradient."""
    a, b = weighting(w1, s, t, tau, alpha), weighting(w2, s, t, tau, alpha)
    d = (s - t).detach()
    e1, e2 = (a * d).sum(-1, keepdim=True), (b * d).sum(-1, keepdim=True)
    g = 0.5 * (b * (d - e1) + a * (d - e2))
    return (g * s).sum(-1)


def official_pairwise(s, t, w1, w2, tau, alpha):
    """Per position: ¼ Σ_y Σ_x w1(y) w2(x) (d[x] − d[y])² (half of L: half of its gradient too)."""
    a, b = weighting(w1, s, t, tau, alpha), weighting(w2, s, t, tau, alpha)
    d = s - t
    return 0.25 * (a.unsqueeze(-1) * b.unsqueeze(-2) * (d.unsqueeze(-2) - d.unsqueeze(-1)) ** 2).sum((-1, -2))


CSD_CASES = [(w1, w2, tau, 0.15) for w1, w2 in itertools.product("STU", repeat=2) for tau in (0.5, 1.0, 1.5)] + [
    ("mix", "S", 1.3, 0.3), ("mix", "mix", 1.0, 0.15), ("T", "mix", 2.0, 0.7), ("mix", "U", 0.7, 1.0)]


@pytest.mark.parametrize("w1,w2,tau,alpha", CSD_CASES)
def test_csd_gradient_is_twice_the_official_surrogates(w1, w2, tau, alpha):
    s, t = logits(1)
    params = dict(w1=w1, w2=w2, tau=tau, alpha=alpha)
    _, g_kd = kdbench_grad("csd", s, t, **params)
    g_off = autograd(lambda x: official_surrogate(x, t, w1, w2, tau, alpha), s)
    torch.testing.assert_close(autograd(lambda x: official_pairwise(x, t, w1, w2, tau, alpha), s), g_off, **EXACT)
    assert ratio(g_kd, g_off) == pytest.approx(2.0, rel=1e-12)
    torch.testing.assert_close(g_kd, 2.0 * g_off, **EXACT)
    # the training path's closed-form gradient (csd_gradient) has the same scale
    _, _, g_train = get_objective("csd", **params).per_position_grad(s, t)
    torch.testing.assert_close(g_train, 2.0 * g_off, **EXACT)


def test_csd_value_is_the_closed_form_not_the_surrogate():
    """kdbench reports L itself (REFERENCE: never a surrogate); the pairwise surrogate is L/2."""
    s, t = logits(2)
    for w1, w2 in (("S", "S"), ("T", "S"), ("U", "S"), ("U", "T")):
        value, _ = kdbench_grad("csd", s, t, w1=w1, w2=w2)
        torch.testing.assert_close(value, 2.0 * official_pairwise(s, t, w1, w2, 1.0, 0.15), **EXACT)


def tempered_rkl(x, t, tau):
    """KL(softmax(x/τ) ‖ softmax(t/τ)) per position (REFERENCE §1 identity)."""
    lq, lp = (x / tau).log_softmax(-1), (t / tau).log_softmax(-1)
    return (lq.exp() * (lq - lp)).sum(-1)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5, 2.0])
def test_csd_ss_against_tempered_reverse_kl(tau):
    """kdbench's csd(S,S) gradient = 2τ² × ∇KL(q_τ‖p_τ); the official surrogate's = τ² ×; at τ = 1
    the official one is exactly reverse KL's gradient (kdbench's `rkl` too)."""
    s, t = logits(3)
    g_rkl_tau = autograd(lambda x: tempered_rkl(x, t, tau), s)
    _, g_kd = kdbench_grad("csd", s, t, w1="S", w2="S", tau=tau)
    g_off = autograd(lambda x: official_surrogate(x, t, "S", "S", tau, 0.15), s)
    torch.testing.assert_close(g_kd, 2 * tau**2 * g_rkl_tau, **EXACT)
    torch.testing.assert_close(g_off, tau**2 * g_rkl_tau, **EXACT)
    if tau == 1.0:
        _, g_rkl = kdbench_grad("rkl", s, t)
        torch.testing.assert_close(g_off, g_rkl, **EXACT)
        torch.testing.assert_close(g_kd, 2.0 * g_rkl, **EXACT)


# ------------------------------------------------------------------------------------------ DLD


def normalise(x, how):
    if how == "none":
        return x
    c = x - x.mean(-1, keepdim=True)
    return c if how == "mean" else c / torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("weight,norm", list(itertools.product("UST", ("none", "mean", "std"))))
def test_dld_is_reference_half_square_and_twice_the_quarter_square(weight, norm):
    """REFERENCE §2: DLD = ½ Σ w (ŝ − t̂)² (kdbench: factor 1); its gradient is 2× that of the
    ¼-weighted square, the DLD that keeps DLD = ½·CSD at the official surrogate's scale."""
    s, t = logits(4)

    def square(x, c):
        w = {"U": torch.full_like(x, 1.0 / V), "S": x.detach().softmax(-1), "T": t.softmax(-1)}[weight]
        return c * (w * (normalise(x, norm) - normalise(t, norm)) ** 2).sum(-1)

    value, g_kd = kdbench_grad("dld", s, t, weight=weight, norm=norm)
    torch.testing.assert_close(value, square(s, 0.5), **EXACT)
    g_quarter = autograd(lambda x: square(x, 0.25), s)
    assert ratio(g_kd, g_quarter) == pytest.approx(2.0, rel=1e-12)
    torch.testing.assert_close(g_kd, 2.0 * g_quarter, **EXACT)


@pytest.mark.parametrize("w", "UST")
def test_dld_at_its_best_constant_is_half_csd(w):
    """REFERENCE §1: DLD with weights w after removing the best per-position constant = ½·CSD(w,w),
    in value and gradient; dld(norm=mean, weight=U) is that for w = U."""
    s, t = logits(5)

    def best_constant_dld(x):
        wt = weighting(w, x, t, 1.0, 0.15)
        d = x - t
        return 0.5 * (wt * (d - (wt * d).sum(-1, keepdim=True)) ** 2).sum(-1)

    value, g_csd = kdbench_grad("csd", s, t, w1=w, w2=w)
    torch.testing.assert_close(best_constant_dld(s), 0.5 * value, **EXACT)
    torch.testing.assert_close(autograd(best_constant_dld, s), 0.5 * g_csd, **EXACT)
    if w == "U":
        v_dld, g_dld = kdbench_grad("dld", s, t, weight="U", norm="mean")
        torch.testing.assert_close(v_dld, 0.5 * value, **EXACT)
        torch.testing.assert_close(g_dld, 0.5 * g_csd, **EXACT)


# ------------------------------------------------------------------------------------------ JSD


def kl(a_log, b_log):
    return (a_log.exp() * (a_log - b_log)).sum(-1)


def gkd_bracket(x, t, beta):
    """REFERENCE §2 (GKD's generalised JSD): β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q."""
    lp, lq = t.log_softmax(-1), x.log_softmax(-1)
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), 0)
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.3, 0.5, 0.9, 0.99])
def test_jsd_is_the_bracket_divided_by_beta_one_minus_beta(beta):
    s, t = logits(6)
    obj = get_objective("jsd", beta=beta)
    _, terms = obj.per_position(s, t)
    value, g_kd = kdbench_grad("jsd", s, t, beta=beta)
    scale = 1.0 / (beta * (1.0 - beta))
    torch.testing.assert_close(value, scale * gkd_bracket(s, t, beta), **SERIES)
    torch.testing.assert_close(terms["unnormalised"], gkd_bracket(s, t, beta), **SERIES)
    g_bracket = autograd(lambda x: gkd_bracket(x, t, beta), s)
    assert ratio(g_kd, g_bracket) == pytest.approx(scale, rel=1e-8)
    torch.testing.assert_close(g_kd, scale * g_bracket, **SERIES)


def test_jsd_half_is_four_textbook_js_and_its_ends_are_the_kls():
    s, t = logits(7)
    p, q = t.softmax(-1), s.softmax(-1)
    lm = ((p + q) / 2).log()
    textbook = 0.5 * kl(t.log_softmax(-1), lm) + 0.5 * kl(s.log_softmax(-1), lm)
    torch.testing.assert_close(kdbench_grad("jsd", s, t, beta=0.5)[0], 4.0 * textbook, **SERIES)
    torch.testing.assert_close(kdbench_grad("jsd", s, t, beta=0.0)[0], kdbench_grad("kl", s, t)[0], **EXACT)
    torch.testing.assert_close(kdbench_grad("jsd", s, t, beta=1.0)[0], kdbench_grad("rkl", s, t)[0], **EXACT)


# ------------------------------------------------------------------- the baselines at factor 1


def _reference_values(name, params, s, t):
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    if name == "kl":
        return kl(lp, lq)
    if name == "rkl":
        return kl(lq, lp)
    if name == "jeffreys":
        return kl(lp, lq) + kl(lq, lp)
    if name == "skl_sym":
        return (1 - params["lam"]) * kl(lp, lq) + params["lam"] * kl(lq, lp)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        a = params["alpha"]
        return kl(lp, (a * p + (1 - a) * q).log())
    if name == "srkl":
        a = params["alpha"]
        return kl(lq, ((1 - a) * p + a * q).log())
    if name == "hinton":
        tau = params["tau"]
        return tau**2 * kl((t / tau).log_softmax(-1), (s / tau).log_softmax(-1))
    if name == "ab":
        a, b = params["alpha"], params["beta"]
        return -1 / (a * b) * (p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1)
    raise AssertionError(name)


@pytest.mark.parametrize("name,params", [
    ("kl", {}), ("rkl", {}), ("jeffreys", {}), ("skl_sym", {"lam": 0.9}), ("tvd", {}), ("skl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.1}), ("hinton", {"tau": 2.0}), ("hinton", {"tau": 1.0}), ("ab", {"alpha": 0.2, "beta": 0.7})])
def test_baselines_are_referenced_formulas_at_factor_one(name, params):
    """No hidden scale: each equals REFERENCE §2's formula as written (Hinton's τ² included)."""
    s, t = logits(8)
    value, _ = kdbench_grad(name, s, t, **params)
    torch.testing.assert_close(value, _reference_values(name, params, s, t), **(SERIES if name in ("skl", "srkl") else EXACT))
