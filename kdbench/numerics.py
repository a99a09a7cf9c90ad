"""Numerics helpers objectives share: rows ``[N, V]`` of log-probabilities in, ``[N]`` out.

Tensor math only (imports nothing from kdbench): :func:`kl_rows` for the KL family and
:func:`scaled_kl_to_mixture` for the skewed / Jensen-Shannon ones, accurate for every mixing
weight. ``kdbench.losses`` re-exports both, so plug-ins that import them from there keep working.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

def kl_rows(la: Tensor, lb: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a (log a − log b) per row, from log-probabilities."""
    return (la.exp() * (la - lb)).sum(-1)


def _g_series(x: Tensor) -> Tensor:
    """(x − log1p x) / x² = Σ_{k≥2} (−x)^(k−2)·(−1)^k / k, 12 terms (|x| < 0.25: rel. err < 1e-8)."""
    acc = torch.full_like(x, 1.0 / 13.0)
    for k in range(12, 1, -1):
        acc = (1.0 / k) - x * acc
    return acc


class _ScaledKLToMixture(torch.autograd.Function):
    """Σ_v a·(x − log1p x)/γ with an analytic backward (nothing but la, lb is saved)."""

    @staticmethod
    def forward(ctx, la: Tensor, lb: Tensor, gamma: float) -> Tensor:
        ctx.gamma = gamma
        ctx.save_for_backward(la, lb)
        a = la.exp()
        u = lb - la
        log_mix = _log_mix(u, gamma)  # log(1 + x) = log((1−γ) + γ·b/a), finite for any logits
        # a·(x − log1p x)/γ = (b − a) − a·log(1+x)/γ : accurate unless |x| is small
        term = torch.addcmul(lb.exp() - a, a, log_mix, value=-1.0 / gamma)
        # |x| < 0.25  ⇔  log(1 − 0.25/γ) < u < log(1 + 0.25/γ)
        small = u < math.log1p(0.25 / gamma)
        if gamma > 0.25:
            small &= u > math.log1p(-0.25 / gamma)
        idx = small.reshape(-1).nonzero().squeeze(1)
        if idx.numel():
            e = torch.expm1(u.reshape(-1).index_select(0, idx))  # b/a − 1
            xs = gamma * e
            # a·(x − log1p x)/γ = a·(b/a − 1)·x·series(x): no cancellation, error ∝ γ
            small_terms = a.reshape(-1).index_select(0, idx) * e * xs * _g_series(xs)
            term.reshape(-1).index_copy_(0, idx, small_terms)
        return term.sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        la, lb = ctx.saved_tensors
        gamma = ctx.gamma
        log_mix = _log_mix(lb - la, gamma)
        b = lb.exp()
        b_over_1px = (lb - log_mix).exp()  # b/(1 + x)
        g = grad.unsqueeze(-1)
        # summand F = (b − a) − a·log(1+x)/γ with ∂x/∂log a = −γ·b/a, ∂x/∂log b = γ·b/a:
        # ∂F/∂log a = b/(1+x) − a − a·log(1+x)/γ ;  ∂F/∂log b = b − b/(1+x)
        grad_la = (b_over_1px - la.exp() * (1.0 + log_mix / gamma)) * g
        grad_lb = (b - b_over_1px) * g
        return grad_la, grad_lb, None


def _log_mix(u: Tensor, gamma: float) -> Tensor:
    return torch.logaddexp(u + math.log(gamma), torch.full_like(u, math.log1p(-gamma)))


def scaled_kl_to_mixture(la: Tensor, lb: Tensor, gamma: float) -> Tensor:
    """KL(a ‖ γ·b + (1−γ)·a) / γ per row, accurate for every γ ∈ [0, 1].

    Per vocabulary entry, with u = log b − log a and x = γ·(b/a − 1) (so the mixture is
    a·(1 + x)), the summand is a·(x − log1p x)/γ ≥ 0. For |x| < 0.25 it is evaluated as
    a·(b/a − 1)·x·series(x) (no cancellation, error ∝ γ), otherwise as
    (b − a) − a·log((1−γ) + γ·b/a)/γ with the log from ``logaddexp`` (no overflow for any
    logits). γ = 1 gives KL(a‖b); γ → 0 goes continuously to 0 (value 0 at γ = 0).
    The backward is analytic (∂/∂log a = b/(1+x) − a − a·log(1+x)/γ, ∂/∂log b = b − b/(1+x)).
    """
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma == 0.0:
        return la[..., 0] * 0.0  # exactly 0, keeps the graph
    if gamma == 1.0:
        return kl_rows(la, lb)
    return _ScaledKLToMixture.apply(la, lb, gamma)
