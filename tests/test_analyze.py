"""Gradient geometry between objective settings on synthetic logits."""

from __future__ import annotations

import pytest
import torch

from kdbench.analyze import format_similarity_table, gradient_similarity


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 6, 40, generator=g) * 2
    t = torch.randn(3, 6, 40, generator=g) * 2
    mask = torch.rand(3, 6, generator=g) > 0.25
    return s, t, mask


def test_csd_ss_is_rkl_direction_with_twice_the_norm(logits):
    s, t, mask = logits
    res = gradient_similarity(["csd", "rkl", "kl", ("csd", {"tau": 1.5}), "csd_ts"], s, t, mask)
    assert res["names"] == ["csd(tau=1.0,w1=S,w2=S)", "rkl", "kl", "csd(tau=1.5,w1=S,w2=S)", "csd(tau=1.0,w1=T,w2=S)"]
    cos, ratio, norms = res["cosine"], res["norm_ratio"], res["grad_norms"]
    assert cos[0][1] == pytest.approx(1.0, abs=1e-6)
    assert ratio[0][1] == pytest.approx(2.0, rel=1e-5) and ratio[1][0] == pytest.approx(0.5, rel=1e-5)
    assert cos[2][1] < 0.99 and cos[1][2] == cos[2][1]  # forward vs reverse KL: different directions
    assert all(cos[i][i] == pytest.approx(1.0) for i in range(5))
    assert norms[0] == pytest.approx(2 * norms[1], rel=1e-5)
    assert res["positions"] == int(mask.sum())
    assert cos[3][0] < 1.0 - 1e-4  # τ changes the weighting, hence the direction


def test_gradients_only_over_counted_positions_and_table(logits):
    s, t, mask = logits
    s2 = s.clone()
    s2[~mask] = 1e3  # changes at uncounted positions must not matter
    a = gradient_similarity(["kl", "tvd"], s, t, mask)
    b = gradient_similarity(["kl", "tvd"], s2, t, mask)
    assert a["cosine"][0][1] == pytest.approx(b["cosine"][0][1], rel=1e-6)
    text = format_similarity_table(a)
    assert "cosine" in text and "norm ratio" in text and "[1] kl" in text and "[2] tvd" in text


def test_zero_gradient_gives_undefined_entries(logits):
    _, t, mask = logits
    res = gradient_similarity(["csd", "kl"], t.clone(), t, mask)  # student == teacher: zero gradients
    assert res["grad_norms"][0] == pytest.approx(0.0, abs=1e-6)
    assert res["cosine"][0][1] is None and res["norm_ratio"][1][0] is None and res["norm_ratio"][0][1] == 0.0
    text = format_similarity_table(gradient_similarity(["csd"], t.clone(), t, torch.zeros_like(mask)))
    assert "-" in text
