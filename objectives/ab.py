"""α-β divergence (ABKD), with its limit cases."""

import torch

from kdbench.registry import Param, objective

#: |α|, |β| or |α+β| below this use the exact limit form (the general formula's cancellation
#: error in float64 is ~1e-16/|α| there, the limit form's truncation error ~|α|).
LIMIT_EPS = 1e-6


@objective(
    "ab",
    behaviour="balanced",
    paper="Wang et al. 2025 (ICML), ABKD: Pursuing a Proper Allocation of the Probability Mass in Knowledge "
    "Distillation via α-β-Divergence, arXiv:2505.04560; divergence: Cichocki, Cruces & Amari 2011, "
    "Generalized Alpha-Beta Divergences and Their Application to Robust Nonnegative Matrix "
    "Factorization, Entropy 13(1):134-170",
    params=[
        Param("alpha", float, 0.2, doc="α (exponent of the teacher p); [−1, 2], the range of the named members: "
              "KL (1,0), reverse KL (0,1), Hellinger (½,½), squared Euclidean (1,1), Pearson χ² (2,−1), "
              "Neyman χ² (−1,2). A negative exponent can overflow for peaked rows (training then stops: "
              "loss not finite); non-negative ones are finite for any logits", min=-1.0, max=2.0),
        Param("beta", float, 0.7, doc="β (exponent of the student q); [−1, 2], as α", min=-1.0, max=2.0),
    ],
)
def ab(s, t, *, alpha, beta):
    """α-β divergence between teacher p and student q; continuous through its limit cases.

    D_AB(p‖q) = −1/(αβ) Σ_v [ p^α q^β − α/(α+β)·p^(α+β) − β/(α+β)·q^(α+β) ]   (α, β, α+β ≠ 0)
    limits (Cichocki, Cruces & Amari 2011):
      β = 0:      1/α² Σ [ p^α log(p^α/q^α) − p^α + q^α ]
      α = 0:      1/β² Σ [ q^β log(q^β/p^β) − q^β + p^β ]
      α = −β:     1/α² Σ [ log(q^α/p^α) + (p/q)^α − 1 ]
      α = β = 0:  ½ Σ (log p − log q)²
    p = softmax(t), q = softmax(s); (α, β) = (1, 0) is KL(p‖q) and (0, 1) is KL(q‖p). Evaluated in float64 (cancellation grows like 1/|α|, 1/|β|); the limit
    forms are used within 1e-6 of the special lines. Negative exponents can overflow to inf
    for extreme logits (the divergence is then genuinely huge).
    """
    lp = t.double().log_softmax(-1)
    lq = s.double().log_softmax(-1)
    a, b = float(alpha), float(beta)
    lam = a + b
    small_a, small_b, small_l = abs(a) < LIMIT_EPS, abs(b) < LIMIT_EPS, abs(lam) < LIMIT_EPS
    if small_a and small_b:
        out = 0.5 * ((lp - lq) ** 2).sum(-1)
    elif small_a:
        qb, pb = torch.exp(b * lq), torch.exp(b * lp)
        out = (qb * (b * (lq - lp)) - qb + pb).sum(-1) / (b * b)
    elif small_b:
        pa, qa = torch.exp(a * lp), torch.exp(a * lq)
        out = (pa * (a * (lp - lq)) - pa + qa).sum(-1) / (a * a)
    elif small_l:
        z = a * (lp - lq)
        out = (torch.expm1(z) - z).sum(-1) / (a * a)
    else:
        cross = torch.exp(a * lp + b * lq)
        out = -(cross - (a / lam) * torch.exp(lam * lp) - (b / lam) * torch.exp(lam * lq)).sum(-1) / (a * b)
    return out.to(s.dtype)
