"""Adaptive KL (AKL): forward/reverse KL weighted by the head and tail gaps."""

import torch

from kdbench.numerics import kl_rows
from kdbench.registry import Param, objective


@objective(
    "akl",
    behaviour="balanced",
    paper="Wu et al. 2025 (COLING), Rethinking Kullback-Leibler Divergence in "
    "Knowledge Distillation for Large Language Models, arXiv:2404.02657",
    params=[Param("mu", float, 0.5, doc="head threshold μ on the teacher's cumulative probability; in [0, 1] "
                  "(0: the head is the top token, 1: every token)", min=0.0, max=1.0)],
)
def akl(s, t, *, mu):
    """Adaptive KL: forward KL weighted by the head gap plus reverse KL weighted by the tail gap.

    Sort the vocabulary by teacher probability p (descending, stable). The head H is the
    top token plus every token whose cumulative teacher probability is ≤ μ; the tail is the rest.
    g_head = Σ_{v∈H} |p(v) − q(v)|,   g_tail = Σ_{v∉H} |p(v) − q(v)|   (no gradient through g)
    AKL = g_head/(g_head+g_tail)·KL(p‖q) + g_tail/(g_head+g_tail)·KL(q‖p)
    FKL fits the head first and RKL the tail first; the weights send each gap to the divergence
    that fixes it. p = q (both gaps 0) uses weights ½, ½ (the value is 0 anyway).
    terms: fkl, rkl, w_head = g_head/(g_head+g_tail).
    """
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    fkl, rkl = kl_rows(lp, lq), kl_rows(lq, lp)
    with torch.no_grad():
        p_sorted, order = lp.exp().sort(dim=-1, descending=True, stable=True)
        gap = (p_sorted - lq.exp().gather(-1, order)).abs()
        tail = p_sorted.cumsum(-1) > mu
        tail[..., :1] = False
        g_tail = (gap * tail).sum(-1)
        g_head = (gap * ~tail).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), torch.full_like(total, 0.5))
    return w_head * fkl + (1.0 - w_head) * rkl, {"fkl": fkl, "rkl": rkl, "w_head": w_head}
