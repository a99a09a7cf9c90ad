"""Direct logit distillation: weighted squared error between logits."""

import torch

from kdbench.registry import Param, objective

_STD_EPS = 1e-6


def _normalise(x, how):
    if how == "none":
        return x
    centred = x - x.mean(-1, keepdim=True)
    if how == "mean":
        return centred
    var = (centred * centred).mean(-1, keepdim=True)
    return centred * torch.rsqrt(var + _STD_EPS)


@objective(
    "dld",
    behaviour="balanced",
    paper="Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?, arXiv:1312.6184; Kim et al. 2021, "
    "Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in Knowledge Distillation, "
    "arXiv:2105.08919; norm=std: Sun et al. 2024, Logit Standardization in Knowledge Distillation, "
    "arXiv:2403.01427",
    params=[
        Param("weight", "choice", "U", choices=("U", "S", "T"),
              doc="weights over the vocabulary: U = 1/V, S = stop-grad softmax(s), T = softmax(t)"),
        Param("norm", "choice", "none", choices=("none", "mean", "std"),
              doc="per-row normalisation of s and t before the residual: none, centre (mean), z-score (std)"),
    ],
)
def dld(s, t, *, weight, norm):
    """Direct logit distillation: weighted squared error between (normalised) logits.

    DLD_w(s, t) = ½ Σ_v w(v)·(ŝ(v) − t̂(v))²
    w: U = 1/V, S = stop_gradient(softmax(s)), T = softmax(t) (weights from the raw logits);
    ŝ, t̂: none = the logits; mean = minus their row mean; std = z-scored per row
    (population std, ε = 1e-6 inside the square root). Only norm = mean/std is shift
    invariant. With w = U and norm = mean, DLD = ½·CSD(U,U); in general DLD_w after removing
    the best per-row constant equals ½·CSD(w,w). The ½ is REFERENCE's (Ba & Caruana's squared
    error); at the official CSD surrogate's scale the same identity gives ¼ Σ w·r², whose
    gradient is half of this one.
    """
    r = _normalise(s, norm) - _normalise(t, norm)
    sq = r * r
    if weight == "U":
        return 0.5 * sq.mean(-1)
    with torch.no_grad():
        w = s.softmax(-1) if weight == "S" else t.softmax(-1)
    return 0.5 * (w * sq).sum(-1)
