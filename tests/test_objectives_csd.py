"""CSD (REFERENCE §1): closed form vs pairwise sum, analytic gradient, the identities."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdbench.registry import get_objective


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest

WEIGHTINGS = ("S", "T", "U", "mix")


def randn(*shape, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def weights(kind, s, t, tau, alpha):
    """The weighting distributions, held constant (REFERENCE §1)."""
    s, t = s.detach(), t.detach()
    S = (s / tau).softmax(-1)
    T = t.softmax(-1)
    if kind == "S":
        return S
    if kind == "T":
        return T
    if kind == "U":
        return torch.full_like(s, 1.0 / s.shape[-1])
    return alpha * T + (1 - alpha) * S


def pairwise_csd(s, t, w1, w2, tau=1.0, alpha=0.15):
    """½ Σ_y Σ_x w1(y) w2(x) (d[x] − d[y])², mean over rows — the O(V²) definition."""
    d = s - t
    a, b = weights(w1, s, t, tau, alpha), weights(w2, s, t, tau, alpha)
    diff = d.unsqueeze(-2) - d.unsqueeze(-1)  # [N, y, x] = d[x] − d[y]
    per_row = 0.5 * (a.unsqueeze(-1) * b.unsqueeze(-2) * diff**2).sum((-1, -2))
    return per_row.mean()


@pytest.mark.parametrize("w1,w2", list(itertools.product(WEIGHTINGS, WEIGHTINGS)))
def test_closed_form_equals_pairwise_sum_value_and_gradient(w1, w2):
    tau, alpha = 1.3, 0.15
    s0, t = randn(7, 9, scale=2.0, seed=1), randn(7, 9, scale=2.0, seed=2)
    s = s0.clone().requires_grad_(True)
    ref = pairwise_csd(s, t, w1, w2, tau, alpha)
    (g_ref,) = torch.autograd.grad(ref, s)
    s = s0.clone().requires_grad_(True)
    obj = get_objective("csd", w1=w1, w2=w2, tau=tau, alpha=alpha)
    got = obj(s, t, None)
    (g,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    # ... and the gradient is the analytic one: w2(k)(d[k] − E_w1 d) + w1(k)(d[k] − E_w2 d)
    d = s0 - t
    a, b = weights(w1, s0, t, tau, alpha), weights(w2, s0, t, tau, alpha)
    e1, e2 = (a * d).sum(-1, keepdim=True), (b * d).sum(-1, keepdim=True)
    analytic = (b * (d - e1) + a * (d - e2)) / s0.shape[0]
    torch.testing.assert_close(g, analytic, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("w1,w2", [("S", "S"), ("U", "S"), ("T", "S"), ("mix", "T")])
def test_float32_closed_form_agrees_with_pairwise_float64(w1, w2):
    s, t = randn(5, 40, scale=3.0, seed=3), randn(5, 40, scale=3.0, seed=4)
    ref = pairwise_csd(s, t, w1, w2, 1.5).item()
    got = get_objective("csd", w1=w1, w2=w2, tau=1.5)(s.float(), t.float(), None).item()
    assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_ss_gradient_is_2tau2_times_tempered_reverse_kl_gradient(tau):
    """The identity: CSD(S,S) and RKL differ in scale, not direction."""
    s0, t = randn(6, 11, scale=2.0, seed=5), randn(6, 11, scale=2.0, seed=6)
    s = s0.clone().requires_grad_(True)
    (g_csd,) = torch.autograd.grad(get_objective("csd", tau=tau)(s, t, None), s)
    s = s0.clone().requires_grad_(True)
    lq, lp = (s / tau).log_softmax(-1), (t / tau).log_softmax(-1)
    rkl_tau = (lq.exp() * (lq - lp)).sum(-1).mean()  # KL(softmax(s/τ) ‖ softmax(t/τ)), written out here
    (g_rkl,) = torch.autograd.grad(rkl_tau, s)
    torch.testing.assert_close(g_csd, 2 * tau**2 * g_rkl, rtol=1e-9, atol=1e-12)
    if tau == 1.0:  # the registered rkl objective too
        s = s0.clone().requires_grad_(True)
        (g_obj,) = torch.autograd.grad(get_objective("rkl")(s, t, None), s)
        torch.testing.assert_close(g_csd, 2 * g_obj, rtol=1e-9, atol=1e-12)


def test_tt_is_the_linearisation_of_forward_kl_near_zero_residual():
    t = randn(5, 13, scale=2.0, seed=7)
    for scale in (1e-2, 1e-3):
        s0 = t + randn(5, 13, scale=scale, seed=8)
        s = s0.clone().requires_grad_(True)
        fkl = get_objective("kl")(s, t, None)
        (g_fkl,) = torch.autograd.grad(fkl, s)
        s = s0.clone().requires_grad_(True)
        csd_tt = get_objective("csd", w1="T", w2="T")(s, t, None)
        (g_csd,) = torch.autograd.grad(csd_tt, s)
        # KL(p‖q) = ½·Var_p(d) + O(d³): relative error O(scale)
        assert fkl.item() == pytest.approx(0.5 * csd_tt.item(), rel=20 * scale)
        torch.testing.assert_close(g_fkl, 0.5 * g_csd, rtol=20 * scale, atol=20 * scale * g_csd.abs().max().item())


@pytest.mark.parametrize("w", ["U", "S", "T"])
def test_dld_after_removing_best_constant_is_half_csd(w):
    s, t = randn(6, 10, scale=2.0, seed=9), randn(6, 10, scale=2.0, seed=10)
    d = s - t
    wt = weights(w, s, t, 1.0, 0.0)
    best = (wt * d).sum(-1, keepdim=True)  # argmin_c Σ w (d − c)²
    dld = get_objective("dld", weight=w)(s - best, t, None).item()  # S weights: softmax is shift invariant
    csd = get_objective("csd", w1=w, w2=w)(s, t, None).item()
    assert dld == pytest.approx(0.5 * csd, rel=1e-10)
    if w == "U":
        assert get_objective("dld", weight="U", norm="mean")(s, t, None).item() == pytest.approx(0.5 * csd, rel=1e-10)
    # CSD's optimum set strictly contains DLD's: a constant shift is free for CSD only
    assert get_objective("csd", w1=w, w2=w)(t + 3.0, t, None).item() == pytest.approx(0.0, abs=1e-12)
    assert get_objective("dld", weight=w)(t + 3.0, t, None).item() == pytest.approx(4.5)


def test_terms_and_closed_form_consistency():
    s, t = randn(4, 12, seed=11).float(), randn(4, 12, seed=12).float()
    out = get_objective("csd_us").compute(s, t, None)
    v1, v2, gap = out.terms["var_w1"], out.terms["var_w2"], out.terms["mean_gap_sq"]
    assert out.loss.item() == pytest.approx(0.5 * (v1 + v2 + gap).item(), rel=1e-6)
    ss = get_objective("csd").compute(s, t, None)
    assert ss.terms["mean_gap_sq"].item() == 0.0
    assert ss.terms["var_w1"].item() == pytest.approx(ss.loss.item(), rel=1e-6)


def test_float32_centring_keeps_large_offsets_accurate():
    """d is centred per row before the variance: a huge common offset costs nothing."""
    s, t = randn(4, 50, scale=2.0, seed=13), randn(4, 50, scale=2.0, seed=14)
    ref = pairwise_csd(s, t, "T", "S")
    got = get_objective("csd_ts")((s + 3000.0).float(), t.float(), None)
    # float32 holds s + 3000 to ~2.4e-4 absolute; the loss must not lose more than that
    assert got.item() == pytest.approx(ref.item(), rel=2e-3)


def test_no_gradient_through_weights_and_none_to_teacher_weights():
    s0, t0 = randn(3, 8, seed=15), randn(3, 8, seed=16)
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    get_objective("csd_ts")(s, t, None).backward()
    # with weights constant, ∂L/∂t = −∂L/∂s (L depends on s − t only)
    torch.testing.assert_close(t.grad, -s.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("w1,w2", list(itertools.product(WEIGHTINGS, WEIGHTINGS)))
@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_declared_closed_form_gradient_equals_autograd_and_values_are_identical(w1, w2, tau):
    """The training path's gradient (csd_gradient, no autograd) against autograd on csd: the
    values and terms are the same bits, the gradient agrees to float64 rounding."""
    s0, t = randn(11, 37, scale=3.0, seed=3), randn(11, 37, scale=3.0, seed=4)
    obj = get_objective("csd", w1=w1, w2=w2, tau=tau, alpha=0.3)
    assert obj.has_gradient
    s = s0.clone().requires_grad_(True)
    values, terms = obj.per_position(s, t)
    (g_ref,) = torch.autograd.grad(values.sum(), s)
    total, term_sums, g = obj.row_sums_grad(s0, t)
    assert torch.equal(total, values.detach().sum())
    assert {k: float(v) for k, v in term_sums.items()} == {k: float(v.detach().sum()) for k, v in terms.items()}
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert float(g.sum(-1).abs().max()) < 1e-12  # shift invariance: each row's gradient sums to 0
