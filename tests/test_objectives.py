"""Objectives: golden values, mathematical properties, numerics, chunking.

Golden values were computed once by an independent float64 NumPy implementation of each
formula in REFERENCE §1–2 (direct sums; CSD by the O(V²) pairwise sum; AKL by an explicit
loop over the teacher-sorted vocabulary; AB limits by Cichocki et al.'s limit forms) on the
fixed inputs below, and pasted here.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdbench import losses
from kdbench.registry import Objective, get_objective, list_objectives


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest

# fixed inputs: [B=2, T=3, V=6]; position (0,2) and (1,1) are not counted
S_LIST = [
    [[2.26, 1.62, -2.39, 1.36, -2.04, 1.34], [-2.83, 1.52, 0.08, -0.99, 2.02, 0.11], [1.62, 0.98, 1.95, -0.53, -1.26, 2.15]],
    [[0.54, -1.92, -1.21, 3.48, 0.72, -0.75], [-1.51, -0.44, 0.42, -2.3, 0.81, -2.27], [1.02, 0.22, 0.88, -2.8, 0.87, -0.38]],
]
T_LIST = [
    [[-2.27, 0.25, -1.62, -2.54, -1.68, 1.27], [1.19, 0.1, -1.7, -1.11, 2.03, 1.39], [-0.56, 1.61, -1.19, -1.25, -0.02, 0.45]],
    [[1.74, -0.84, 0.82, 0.79, 2.04, -0.51], [-1.27, 0.93, 2.21, -0.77, -2.53, 0.35], [-1.78, -0.84, 1.4, -0.73, -0.61, 0.3]],
]
S, T = torch.tensor(S_LIST), torch.tensor(T_LIST)
MASK = torch.tensor([[True, True, False], [True, False, True]])
LABELS = torch.tensor([[0, 4, 2], [3, 1, 5]])

GOLDEN = {
    "kl": 1.0020579346949734,
    "rkl": 1.098504772174186,
    "jeffreys": 2.1005627068691592,
    "skl_sym": 1.0888600884262647,
    "skl_sym(lam=0.3)": 1.030991985938737,
    "jsd(beta=0.5)": 0.8695999747833867,
    "jsd(beta=0.1)": 0.9238126240595677,
    "jsd(beta=0.9)": 0.9930300635591134,
    "tvd": 0.5474719678967656,
    "skl": 0.71068467320006,
    "skl(alpha=0.4)": 0.30974244659911615,
    "srkl": 0.7455790506796366,
    "srkl(alpha=0.4)": 0.29414139844669773,
    "akl": 1.0328389022319726,
    "akl(mu=0.8)": 1.0459668303479597,
    "ab(alpha=0.2,beta=0.7)": 1.206991683318939,
    "ab(alpha=0.0,beta=0.7)": 1.8816989388014447,
    "ab(alpha=0.2,beta=0.0)": 6.183962832609964,
    "ab(alpha=0.5,beta=-0.5)": 13.861666586631404,
    "ab(alpha=0.0,beta=0.0)": 10.812546521242556,
    "ab(alpha=1.0,beta=0.0)": 1.0020579346949732,
    "ab(alpha=-0.3,beta=0.8)": 3.1984647176396193,
    "hinton": 1.3375781445605488,
    "hinton(tau=1.0)": 1.0020579346949734,
    "dld(norm=none,weight=U)": 1.9430916666666662,
    "dld(norm=mean,weight=U)": 1.614115972222222,
    "dld(norm=std,weight=U)": 0.7665674132288055,
    "dld(norm=none,weight=S)": 2.8035751583777295,
    "dld(norm=mean,weight=S)": 2.3049019422648613,
    "dld(norm=std,weight=S)": 0.9698962082987571,
    "dld(norm=none,weight=T)": 1.0431070879378361,
    "dld(norm=mean,weight=T)": 1.030697945546729,
    "dld(norm=std,weight=T)": 0.6019367739174876,
    "csd(w1=S,w2=S,tau=1.0)": 1.9128945829080755,
    "csd(w1=S,w2=S,tau=1.5)": 2.4798958596939724,
    "csd(w1=U,w2=S,tau=1.0)": 3.919017914487083,
    "csd(w1=T,w2=S,tau=1.0)": 4.181094918289939,
    "csd(w1=T,w2=T,tau=1.0)": 1.5690695156350083,
    "csd(w1=U,w2=U,tau=1.0)": 3.2282319444444436,
    "csd(w1=mix,w2=S,tau=1.5)": 2.676971328081227,
    "csd(w1=T,w2=U,tau=1.0)": 2.644813917768951,
    "ce": 1.0750084056980438,
    # aliases resolve to the same numbers
    "csd_ss": 1.9128945829080755,
    "csd_us": 3.919017914487083,
    "csd_ts": 4.181094918289939,
}

BUILTIN = ["ab", "akl", "ce", "csd", "dld", "hinton", "jeffreys", "jsd", "kl", "rkl", "skl", "skl_sym", "srkl", "tvd"]

# every objective at defaults plus parameter values that take other code paths
VARIANTS = BUILTIN + [
    "csd(w1=U,w2=S)", "csd(w1=T,w2=S)", "csd(w1=T,w2=T)", "csd(w1=mix,w2=U,tau=1.5)", "csd(w1=U,w2=U)",
    "dld(weight=S,norm=mean)", "dld(weight=T,norm=std)", "jsd(beta=0.0)", "jsd(beta=1.0)", "jsd(beta=0.02)",
    "skl(alpha=0.0)", "srkl(alpha=0.97)", "ab(alpha=0.0,beta=0.0)", "ab(alpha=0.5,beta=-0.5)", "ab(alpha=0.0,beta=1.0)",
    "hinton(tau=0.5)", "akl(mu=0.9)",
]

# objectives invariant to adding a per-position constant to s (or t)
SHIFT_INVARIANT = [v for v in VARIANTS if v != "ce" and not (v.startswith("dld") and "norm" not in v)]


def randn(*shape, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def run(setting, s, t, mask=None, labels=None, **kw):
    return get_objective(setting)(s, t, mask, labels, **kw)


def test_builtin_objectives_are_all_registered():
    names = {s.name for s in list_objectives()}
    assert set(BUILTIN) <= names


@pytest.mark.parametrize("setting", sorted(GOLDEN))
def test_golden_values(setting):
    value = run(setting, S, T, MASK, LABELS)
    assert value.dim() == 0 and value.dtype == torch.float32
    assert value.item() == pytest.approx(GOLDEN[setting], rel=1e-6, abs=1e-6)


def test_golden_terms():
    out = get_objective("jsd", beta=0.5).compute(S, T, MASK)
    # β·KL(p‖m)+(1−β)·KL(q‖m) at β = 0.5 is the textbook JS divergence = jsd/4
    assert out.terms["unnormalised"].item() == pytest.approx(GOLDEN["jsd(beta=0.5)"] / 4, rel=1e-5)
    out = get_objective("jeffreys").compute(S, T, MASK)
    assert out.terms["fkl"].item() == pytest.approx(GOLDEN["kl"], rel=1e-6)
    assert out.terms["rkl"].item() == pytest.approx(GOLDEN["rkl"], rel=1e-6)
    out = get_objective("csd_ts").compute(S, T, MASK)
    assert set(out.terms) == {"var_w1", "var_w2", "mean_gap_sq"}
    half = 0.5 * sum(v.item() for v in out.terms.values())
    assert half == pytest.approx(GOLDEN["csd_ts"], rel=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.terms.values())
    assert get_objective("kl").compute(S, T, MASK).terms == {}


@pytest.mark.parametrize("setting", [v for v in VARIANTS if v != "ce"])  # ce has no teacher to equal
def test_zero_when_distributions_equal(setting):
    t = randn(3, 4, 17, seed=1)
    labels = torch.zeros(3, 4, dtype=torch.long)
    assert run(setting, t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    if setting in SHIFT_INVARIANT:  # includes CSD and dld(norm=mean/std): s − t constant per position
        c = randn(3, 4, 1, scale=5.0, seed=2)
        assert run(setting, t + c, t, labels=labels).item() == pytest.approx(0.0, abs=2e-5)


def test_dld_without_normalisation_is_not_zero_under_a_shift():
    t = randn(2, 3, 11, seed=1)
    assert run("dld", t + 1.0, t).item() == pytest.approx(0.5, rel=1e-5)  # ½·mean(1²)
    assert run("csd", t + 1.0, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("setting", VARIANTS)
def test_nonnegative(setting):
    for seed in range(3):
        s, t = randn(4, 5, 23, scale=3.0, seed=seed), randn(4, 5, 23, scale=3.0, seed=seed + 10)
        labels = torch.randint(0, 23, (4, 5), generator=torch.Generator().manual_seed(seed))
        obj = get_objective(setting)
        rows, _ = obj.per_position(s.reshape(-1, 23), t.reshape(-1, 23), labels.reshape(-1))
        assert bool((rows >= -1e-6).all()), rows.min()


@pytest.mark.parametrize("setting", SHIFT_INVARIANT)
def test_shift_invariance(setting):
    s, t = randn(3, 4, 19, scale=2.0, seed=3), randn(3, 4, 19, scale=2.0, seed=4)
    cs, ct = randn(3, 4, 1, scale=20.0, seed=5), randn(3, 4, 1, scale=20.0, seed=6)
    base = run(setting, s, t).item()
    assert run(setting, s + cs, t + ct).item() == pytest.approx(base, rel=2e-4, abs=2e-5)


# ---------------------------------------------------------------------------------------------
# continuity at parameter limits
# ---------------------------------------------------------------------------------------------


def assert_converges(value_at, limit, eps_list, tol=2e-6):
    """|f(ε) − f(0)| shrinks at least linearly: ≤ 3·slope·|ε| + tol, slope measured at the largest ε."""
    e0 = eps_list[0]
    slope = abs(value_at(e0) - limit) / abs(e0)
    for eps in eps_list[1:]:
        err = abs(value_at(eps) - limit)
        assert err <= 3 * slope * abs(eps) + tol * max(1.0, abs(limit)), (eps, err, slope)


def ref_kl_to_mixture(a, b, gamma):
    """Independent float64 KL(a ‖ γb + (1−γ)a) = Σ a·(x − log1p x), x = γ(b/a − 1)."""
    a, b = a.double(), b.double()
    x = gamma * (b / a - 1)
    return (a * (x - torch.log1p(x))).sum(-1)


def ref_jsd(s, t, beta):
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    return (ref_kl_to_mixture(p, q, 1 - beta) / (1 - beta) + ref_kl_to_mixture(q, p, beta) / beta).mean().item()


def ref_skl(s, t, alpha):
    return ref_kl_to_mixture(t.double().softmax(-1), s.double().softmax(-1), 1 - alpha).mean().item()


def ref_srkl(s, t, alpha):
    return ref_kl_to_mixture(s.double().softmax(-1), t.double().softmax(-1), 1 - alpha).mean().item()


@pytest.fixture(scope="module")
def st():
    return randn(4, 3, 29, scale=1.5, seed=7), randn(4, 3, 29, scale=1.5, seed=8)


EPS = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]


@pytest.mark.parametrize(
    "name,ref,limit_at_0,limit_at_1",
    [("jsd", ref_jsd, "kl", "rkl"), ("skl", ref_skl, "kl", None), ("srkl", ref_srkl, "rkl", None)],
)
def test_mixture_divergences_accurate_and_continuous_at_both_ends(st, name, ref, limit_at_0, limit_at_1):
    s, t = st
    param = "beta" if name == "jsd" else "alpha"
    ours = lambda x: get_objective(name, **{param: x})(s, t, None).item()  # noqa: E731
    # skl / srkl at α = 1 are identically 0 (nothing to train: out of the declared range); the
    # function itself still goes there continuously
    declared = lambda x: Objective(get_objective(name).spec, {param: x})(s, t, None).item()  # noqa: E731
    for end, limit_name in ((0.0, limit_at_0), (1.0, limit_at_1)):
        limit = 0.0 if limit_name is None else run(limit_name, s, t).item()
        assert (ours if limit_name else declared)(end) == pytest.approx(limit, rel=1e-6, abs=1e-7)  # the end point
        if limit_name is None:
            with pytest.raises(ValueError, match=r"must be in \[0.0, 1.0\)"):
                ours(end)
        prev_err = math.inf
        for eps in EPS:
            x = eps if end == 0.0 else 1.0 - eps
            r = ref(s, t, x)
            # float32 evaluation is accurate right up to the end (no cancellation blow-up) ...
            assert ours(x) == pytest.approx(r, rel=2e-5, abs=1e-7), (x, ours(x), r)
            # ... and the function really tends to the limit value
            err = abs(r - limit)
            assert err <= prev_err + 1e-12
            prev_err = err
        assert prev_err <= 1e-4 * max(1.0, limit)


def test_scaled_kl_to_mixture_matches_float64_reference():
    la = randn(6, 31, scale=3.0, seed=11).log_softmax(-1)
    lb = randn(6, 31, scale=3.0, seed=12).log_softmax(-1)
    for gamma in (1e-7, 1e-4, 0.1, 0.2, 0.5, 0.9, 1 - 1e-6, 1.0):
        ref = ref_kl_to_mixture(la.exp(), lb.exp(), gamma) / gamma
        got = losses.scaled_kl_to_mixture(la, lb, gamma)
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("gamma", [1e-3, 0.3, 0.999])
def test_scaled_kl_to_mixture_analytic_backward(gamma):
    # finite differences in float64 on the log-probabilities
    la = randn(3, 7, scale=2.0, seed=13, dtype=torch.float64).log_softmax(-1).requires_grad_(True)
    lb = randn(3, 7, scale=2.0, seed=14, dtype=torch.float64).log_softmax(-1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: losses.scaled_kl_to_mixture(x, y, gamma), (la, lb))
    # through log_softmax in float32 against autograd of the float64 definition
    s0, t0 = randn(4, 23, scale=2.0, seed=15), randn(4, 23, scale=2.0, seed=16)
    s = s0.clone().requires_grad_(True)
    losses.scaled_kl_to_mixture(t0.log_softmax(-1), s.log_softmax(-1), gamma).sum().backward()
    s64 = s0.double().requires_grad_(True)
    a, b = t0.double().softmax(-1), s64.softmax(-1)
    (a * (a.log() - (gamma * b + (1 - gamma) * a).log())).sum().div(gamma).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "limit,moving",
    [
        ({"alpha": 0.0, "beta": 0.7}, "alpha"),
        ({"alpha": 0.2, "beta": 0.0}, "beta"),
        ({"alpha": -0.4, "beta": 0.0}, "beta"),
        ({"alpha": 0.5, "beta": -0.5}, "beta"),
        ({"alpha": 0.0, "beta": 0.0}, "both"),
    ],
)
def test_ab_continuous_across_limit_cases(st, limit, moving):
    s, t = st
    at_limit = get_objective("ab", **limit)(s, t, None).item()

    def value_at(eps):
        p = {"alpha": eps, "beta": 0.6 * eps} if moving == "both" else {**limit, moving: limit[moving] + eps}
        return get_objective("ab", **p)(s, t, None).item()

    # both sides of the 1e-6 switch to the limit form, and both signs
    assert_converges(value_at, at_limit, [1e-3, 1e-4, 2e-6, 1.01e-6, 0.99e-6, 3e-7, -3e-7, -2e-6, -1e-4])


# ---------------------------------------------------------------------------------------------
# numerics: dtypes, empty masks, huge logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", VARIANTS)
def test_bfloat16_inputs(setting):
    s, t = randn(3, 4, 21, scale=2.0, seed=21), randn(3, 4, 21, scale=2.0, seed=22)
    labels = torch.randint(0, 21, (3, 4), generator=torch.Generator().manual_seed(1))
    sb, tb = s.bfloat16(), t.bfloat16()
    obj = get_objective(setting)
    got = obj(sb, tb, None, labels)
    assert got.dtype == torch.float32
    # computed in float32: identical to the float32 path on the same (rounded) values
    assert got.item() == pytest.approx(obj(sb.float(), tb.float(), None, labels).item(), rel=1e-6, abs=1e-7)
    # stated tolerance against the unrounded float32 logits (bf16 keeps 8 mantissa bits)
    assert got.item() == pytest.approx(obj(s, t, None, labels).item(), rel=3e-2, abs=1e-2)
    sb.requires_grad_(True)
    obj(sb, tb, None, labels).backward()
    assert sb.grad.dtype == torch.bfloat16 and bool(torch.isfinite(sb.grad.float()).all())


@pytest.mark.parametrize("setting", VARIANTS)
def test_all_masked_is_exact_zero_and_backward_works(setting):
    s = randn(2, 3, 13, seed=31).requires_grad_(True)
    t = randn(2, 3, 13, seed=32)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = get_objective(setting).compute(s, t, mask, torch.zeros(2, 3, dtype=torch.long))
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    assert out.loss.requires_grad
    out.loss.backward()
    assert s.grad is not None and bool((s.grad == 0).all())
    assert all(v.item() == 0.0 for v in out.terms.values())


# ab with a negative exponent is left out: the divergence itself is ~exp(1e4) for such logits.
@pytest.mark.parametrize("setting", [v for v in VARIANTS if v != "ab(alpha=0.5,beta=-0.5)"])
def test_finite_for_logits_of_magnitude_1e4(setting):
    s = randn(2, 3, 17, scale=1e4, seed=41).requires_grad_(True)
    t = randn(2, 3, 17, scale=1e4, seed=42)
    labels = torch.randint(0, 17, (2, 3), generator=torch.Generator().manual_seed(2))
    loss = get_objective(setting)(s, t, None, labels)
    assert math.isfinite(loss.item())
    loss.backward()
    assert bool(torch.isfinite(s.grad).all())


def test_caller_autocast_does_not_lower_the_objective_precision():
    s, t = randn(3, 4, 21, scale=2.0, seed=23), randn(3, 4, 21, scale=2.0, seed=24)
    for setting in ("csd_ts", "jsd", "ab", "akl"):
        ref = run(setting, s, t).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert run(setting, s, t).item() == ref


def test_float64_inputs_stay_float64():
    out = get_objective("kl")(torch.tensor(S_LIST, dtype=torch.float64), torch.tensor(T_LIST, dtype=torch.float64), MASK)
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(GOLDEN["kl"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# chunking, masking, vocabulary
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", VARIANTS)
def test_chunked_equals_unchunked(setting, monkeypatch):
    s0, t = randn(3, 5, 23, scale=2.0, seed=51), randn(3, 5, 23, scale=2.0, seed=52)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    labels = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(4))
    obj = get_objective(setting)
    results = []
    for chunk, ckpt in [(None, False), (2, False), (2, True), (4, True)]:
        s = s0.clone().requires_grad_(True)
        out = obj.compute(s, t, mask, labels, chunk_size=chunk, checkpoint=ckpt)
        out.loss.backward()
        results.append((out.loss.detach(), s.grad, out.terms))
    monkeypatch.setattr(losses, "CHUNK_SIZE", 3)  # the module constant is the default
    s = s0.clone().requires_grad_(True)
    out = obj.compute(s, t, mask, labels)
    out.loss.backward()
    results.append((out.loss.detach(), s.grad, out.terms))
    ref_loss, ref_grad, ref_terms = results[0]
    for loss, grad, terms in results[1:]:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
        assert terms.keys() == ref_terms.keys()
        for k in terms:
            torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-6, atol=1e-7)


def test_mask_selects_positions_and_mean_is_over_counted():
    obj = get_objective("kl")
    per_row, _ = obj.per_position(S.reshape(-1, 6), T.reshape(-1, 6))
    counted = per_row[MASK.reshape(-1)]
    assert obj(S, T, MASK).item() == pytest.approx(counted.mean().item(), rel=1e-6)
    assert obj(S, T, None).item() == pytest.approx(per_row.mean().item(), rel=1e-6)
    assert obj(S, T, MASK.long()).item() == pytest.approx(counted.mean().item(), rel=1e-6)
    assert obj(S[0], T[0], MASK[0]).item() == pytest.approx(per_row[:2].mean().item(), rel=1e-6)  # [T, V] inputs


def test_vocabulary_padding_is_sliced_and_true_mismatch_is_an_error():
    obj = get_objective("csd")
    pad_s = torch.cat([S, torch.full((2, 3, 2), 7.0)], -1)
    pad_t = torch.cat([T, torch.full((2, 3, 5), -3.0)], -1)
    assert obj(pad_s, pad_t, MASK, vocab_size=6).item() == pytest.approx(GOLDEN["csd_ss"], rel=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        obj(pad_s, pad_t, MASK)
    with pytest.raises(ValueError, match="larger than the logits"):
        obj(S, T, MASK, vocab_size=7)
    assert get_objective("ce")(pad_s, None, MASK, LABELS, vocab_size=6).item() == pytest.approx(GOLDEN["ce"], rel=1e-6)


def test_input_validation_messages():
    with pytest.raises(ValueError, match="needs teacher_logits"):
        get_objective("kl")(S, None, MASK)
    with pytest.raises(ValueError, match="needs labels"):
        get_objective("ce")(S, None, MASK)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        get_objective("ce")(S, None, MASK, torch.full((2, 3), -100))
    with pytest.raises(ValueError, match="mask has shape"):
        get_objective("kl")(S, T, MASK[:, :2])
    # ce ignores the teacher entirely (None or not)
    assert get_objective("ce")(S, T, MASK, LABELS).item() == pytest.approx(GOLDEN["ce"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# declared parameter ranges: values inside train, values outside are refused
# ---------------------------------------------------------------------------------------------

# a parameter that matters only in some settings is tried in one where it does
ACTIVE = {("csd", "alpha"): {"w1": "mix"}}


def _numeric_params():
    return [(spec.name, p) for spec in list_objectives(include_plugins=False) for p in spec.params
            if p.type in ("float", "int")]


def _bounds(p):
    """The extreme values the range admits (just inside an exclusive end) and its exact extra values."""
    lo = p.min * (1 + 1e-6) + 1e-12 if p.min_exclusive else p.min
    hi = p.max - max(abs(p.max) * 1e-6, 1e-12) if p.max_exclusive else p.max
    return [lo, hi, *p.also]


def _outside(p):
    """Values just outside the range (below, above)."""
    below = p.min if p.min_exclusive else (p.min * 0.9 if p.min > 0 else p.min - 1e-3)
    above = p.max if p.max_exclusive else p.max + max(abs(p.max) * 1e-3, 1e-3)
    return [v for v in (below, above) if v not in p.also]


def test_every_builtin_numeric_parameter_declares_a_finite_range():
    for name, p in _numeric_params():
        assert p.min is not None and p.max is not None, f"{name}.{p.name} has no range: {p.range_text()!r}"
        assert math.isfinite(p.min) and math.isfinite(p.max)
        assert "[" in p.range_text() or "(" in p.range_text()


@pytest.mark.parametrize("name,param", [(n, p.name) for n, p in _numeric_params()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_range_bounds_give_finite_loss_and_gradients(name, param, dtype):
    p = get_objective(name).spec.param(param)
    for value in _bounds(p):
        obj = get_objective(name, **{param: value}, **ACTIVE.get((name, param), {}))
        for scale in (3.0, 1e4):
            if name == "ab" and value < 0 and scale > 10:
                continue  # a negative exponent of a probability of e^-1e4: the divergence itself overflows (its doc)
            s = randn(2, 3, 17, scale=scale, seed=51).to(dtype).requires_grad_(True)
            t = randn(2, 3, 17, scale=scale, seed=52).to(dtype)
            loss = obj(s, t, None)
            loss.backward()
            assert math.isfinite(loss.item()), (obj.setting, scale, loss.item())
            assert bool(torch.isfinite(s.grad.float()).all()), (obj.setting, scale)


@pytest.mark.parametrize("name,param", [(n, p.name) for n, p in _numeric_params()])
def test_values_just_outside_the_range_are_refused(name, param):
    p = get_objective(name).spec.param(param)
    for value in _outside(p):
        with pytest.raises(ValueError, match="must be in"):
            get_objective(name, **{param: value})
        with pytest.raises(ValueError, match="must be in"):
            get_objective(f"{name}({param}={value!r})")


@pytest.mark.parametrize("setting,params,scale", [
    ("csd", {"tau": 1e-320}, 1.0),      # s/τ overflows: NaN weights
    ("hinton", {"tau": 1e-320}, 1.0),   # t/τ overflows
    ("hinton", {"tau": 1e30}, 1.0),     # τ² overflows float32: inf·0
    ("jsd", {"beta": 1e-35}, 1e4),      # KL(q‖m)/β overflows for extreme logits
])
def test_values_the_ranges_exclude_do_not_train(setting, params, scale):
    """Why the ranges stop where they do: the declared function, bypassing the range, is not finite."""
    base = get_objective(setting)
    obj = Objective(base.spec, {**base.params, **params})
    s = randn(2, 3, 17, scale=scale, seed=51).requires_grad_(True)
    t = randn(2, 3, 17, scale=scale, seed=52)
    loss = obj(s, t, None)
    loss.backward()
    assert not (math.isfinite(loss.item()) and bool(torch.isfinite(s.grad).all()))


@pytest.mark.parametrize("name", ["skl", "srkl"])
def test_skew_kls_at_alpha_one_have_nothing_to_train(name):
    obj = Objective(get_objective(name).spec, {"alpha": 1.0})
    s = randn(2, 3, 17, scale=3.0, seed=51).requires_grad_(True)
    loss = obj(s, randn(2, 3, 17, scale=3.0, seed=52), None)
    assert loss.item() == 0.0
    grad = torch.autograd.grad(loss, s, allow_unused=True)[0] if loss.requires_grad else None
    assert grad is None or bool((grad == 0).all())


def test_values_used_by_committed_results_and_tests_stay_inside_the_ranges():
    for setting in ["csd(tau=1.0)", "csd(tau=1.5,w1=T)", "csd(tau=2.0)", "csd(w1=mix,alpha=0.15)", "skl(alpha=0.1)",
                    "srkl(alpha=0.1)", "jsd(beta=0.5)", "jsd(beta=0.1)", "jsd(beta=0.9)", "akl(mu=0.5)",
                    "skl_sym(lam=0.9)", "ab(alpha=0.2,beta=0.7)", "hinton(tau=2.0)", "hinton(tau=0.5)", *VARIANTS]:
        get_objective(setting)


# ---------------------------------------------------------------------------------------------
# the objective contract the start-up check enforces (kdbench/engine/check.py): built-ins keep it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", VARIANTS + ["ab(alpha=-1.0,beta=2.0)", "hinton(tau=0.05)", "csd(tau=100.0)",
                                                "jsd(beta=1e-30)", "skl(alpha=0.999999)"])
def test_builtins_keep_the_contract_the_startup_check_enforces(setting):
    from kdbench.engine.check import check_contract

    s, t = randn(8, 41, scale=3.0, seed=61), randn(8, 41, scale=3.0, seed=62)
    labels = torch.randint(0, 41, (8,), generator=torch.Generator().manual_seed(3))
    s_before, t_before = s.clone(), t.clone()
    check_contract(get_objective(setting), s, t, labels)
    assert torch.equal(s, s_before) and torch.equal(t, t_before)


def test_a_loss_that_is_not_finite_keeps_the_contract():
    """NaN is training's business (the run fails at step 1, recorded), not a broken contract."""
    from kdbench.engine.check import check_contract
    from kdbench.registry import ObjectiveSpec

    spec = ObjectiveSpec(name="nan_plug", params=[], formula="", paper="-", behaviour="balanced",
                         source="/x/nan_plug.py", fn=lambda s, t: (s - t).sum(-1) * float("nan"))
    check_contract(Objective(spec, {}), randn(4, 9, seed=1), randn(4, 9, seed=2), None)
