"""The paired statistics of kdbench.metrics.stats against hand-computed values, and the equivalence classes
of kdbench.results.equivalence on hand-written gradient-similarity artifacts (pure functions, no store).

Bootstrap facts used below (B replicates, n units resampled with replacement):
* two prompts with differences {0, 2}: a replicate mean is 0, 1 or 2 with probabilities 1/4, 1/2, 1/4, so the
  2.5 / 97.5 percentiles are exactly 0 and 2 and #{replicates <= 0} / B -> 1/4, i.e. p -> 2 · 1/4 = 0.5;
* the bootstrap variance of a mean of n values is the plug-in variance (n-1)/n · s^2 / n (s: sample std).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdbench.metrics.stats import (
    Z_975,
    bootstrap_p,
    paired_bootstrap,
    paired_normal_se,
    paired_ratio_bootstrap,
    paired_replicates,
    resolution,
)
from kdbench.results.equivalence import PARALLEL_COSINE, class_of, equivalence_classes, pair_reason

B = 2000
P_FLOOR = 2 / (B + 1)  # the smallest p a bootstrap of B replicates reports


def test_two_prompts_exact_distribution():
    r = paired_bootstrap(np.array([0.0, 2.0]), n_boot=B)
    assert r["mean"] == 1.0 and (r["lo"], r["hi"]) == (0.0, 2.0)
    assert r["p"] == pytest.approx(0.5, abs=0.05) and not r["separated"]
    assert r["se"] == pytest.approx(math.sqrt(0.5), rel=0.05)  # replicate variance: (1/4 + 1/4) · 1
    assert (r["n_prompts"], r["n_train_seeds"], r["n_cells"], r["n_boot"]) == (2, 1, 2, B)


def test_constant_and_zero_differences():
    const = paired_bootstrap(np.full((5, 3), 0.7), n_boot=B)
    assert (const["mean"], const["lo"], const["hi"]) == pytest.approx((0.7, 0.7, 0.7))
    assert const["p"] == pytest.approx(P_FLOOR) and const["separated"] and const["se"] == pytest.approx(0.0)
    zero = paired_bootstrap(np.zeros((5, 3)), n_boot=B)
    assert zero["p"] == 1.0 and not zero["separated"]
    neg = paired_bootstrap(-np.arange(1.0, 6.0), n_boot=B)  # every replicate < 0
    assert neg["p"] == pytest.approx(P_FLOOR) and neg["hi"] < 0


def test_undefined_with_one_prompt():
    r = paired_bootstrap(np.array([[1.0, 2.0, 3.0]]))  # one prompt, three sampling seeds
    assert r["mean"] == 2.0 and math.isnan(r["p"]) and math.isnan(r["lo"]) and not r["separated"]
    empty = paired_bootstrap(np.full((4, 2), np.nan))
    assert math.isnan(empty["mean"]) and empty["n_prompts"] == 0


def test_point_estimate_with_missing_cells():
    # [training seeds, prompts, sampling seeds]; NaN = not aligned
    d = np.array([[[1.0, 3.0], [5.0, np.nan], [np.nan, np.nan]],
                  [[0.0, 0.0], [np.nan, 2.0], [4.0, 4.0]]])
    # seed 0: prompt means 2, 5 -> 3.5; seed 1: prompt means 0, 2, 4 -> 2; estimate (3.5 + 2) / 2
    r = paired_replicates(d, n_boot=10)
    assert r["estimate"] == pytest.approx(2.75)
    assert (r["n_prompts"], r["n_train_seeds"], r["n_cells"]) == (3, 2, 8)  # 3 + 5 values


def test_se_matches_the_closed_form_normal_approximation():
    rng = np.random.default_rng(7)
    d = rng.normal(0.4, 2.0, size=(200, 3))
    closed = paired_normal_se(d)
    prompt_means = d.mean(axis=1)
    assert closed == pytest.approx(prompt_means.std(ddof=1) / math.sqrt(200))
    r = paired_bootstrap(d, n_boot=4000, seed=3)
    assert r["mean"] == pytest.approx(prompt_means.mean())
    assert r["se"] == pytest.approx(math.sqrt(199 / 200) * closed, rel=0.04)
    assert r["lo"] == pytest.approx(r["mean"] - Z_975 * closed, abs=0.25 * closed)
    assert r["hi"] == pytest.approx(r["mean"] + Z_975 * closed, abs=0.25 * closed)
    # the normal-approximation p for z = mean / se, within Monte-Carlo error
    z = r["mean"] / closed
    assert r["p"] == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.02)
    # reproducible: same seed, same answer
    assert paired_bootstrap(d, n_boot=4000, seed=3) == r


def test_two_levels_training_seed_variance_counts():
    # a pure training-seed effect: seed 0 differs by 1 on every prompt, seed 1 by 3
    d = np.stack([np.full((6, 3), 1.0), np.full((6, 3), 3.0)])
    r = paired_bootstrap(d, n_boot=B)
    # seed resamples {1,1}, {1,3}, {3,3}: replicate 1, 2, 3 with probabilities 1/4, 1/2, 1/4
    assert r["mean"] == 2.0 and (r["lo"], r["hi"]) == (1.0, 3.0) and r["n_train_seeds"] == 2
    assert r["se"] == pytest.approx(math.sqrt(0.5), rel=0.05)
    # a single training seed has no seed level: zero-width
    one = paired_bootstrap(d[:1], n_boot=B)
    assert (one["lo"], one["hi"]) == (1.0, 1.0)


def test_prompts_are_crossed_with_training_seeds():
    # the same prompt effect in both training seeds counts once (one prompt draw for every seed): stacking
    # two identical seeds gives exactly the single-seed bootstrap
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, size=(50, 3))
    one, two = paired_bootstrap(d), paired_bootstrap(np.stack([d, d]))
    for k in ("mean", "lo", "hi", "p", "se"):
        assert two[k] == pytest.approx(one[k], rel=1e-12, abs=1e-12)
    assert (one["n_cells"], two["n_cells"]) == (150, 300)


def test_strata_average_of_tasks():
    rng = np.random.default_rng(2)
    t1, t2 = rng.normal(1.0, 1.0, size=(120, 3)), rng.normal(-0.5, 3.0, size=(80, 2))
    r = paired_bootstrap([t1, t2], n_boot=4000)
    assert r["mean"] == pytest.approx((t1.mean() + t2.mean()) / 2)
    se1, se2 = paired_normal_se(t1), paired_normal_se(t2)
    assert paired_normal_se([t1, t2]) == pytest.approx(math.sqrt(se1 ** 2 + se2 ** 2) / 2)
    plug_in = math.sqrt(119 / 120 * se1 ** 2 + 79 / 80 * se2 ** 2) / 2
    assert r["se"] == pytest.approx(plug_in, rel=0.05)
    assert r["n_prompts"] == 200
    assert math.isnan(paired_normal_se(np.stack([t1, t1])))  # several training seeds: no closed form here


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="training-seed axis"):
        paired_bootstrap([np.zeros((2, 5, 3)), np.zeros((3, 5, 3))])
    with pytest.raises(ValueError, match="must be"):
        paired_bootstrap(np.zeros((2, 2, 2, 2)))


def test_bootstrap_p_by_hand():
    assert bootstrap_p([-1.0, 1.0, 2.0, 3.0]) == pytest.approx(2 * (1 + 1) / 5)  # one replicate <= 0
    assert bootstrap_p([1.0, 2.0, 3.0]) == pytest.approx(2 * 1 / 4)
    assert bootstrap_p([0.0, 0.0]) == 1.0
    assert math.isnan(bootstrap_p([np.nan]))


def test_ratio_bootstrap_shares_draws():
    rng = np.random.default_rng(4)
    den = rng.normal(10.0, 2.0, size=(30, 3))
    r = paired_ratio_bootstrap(0.5 * den, den, scale=100.0)
    assert (r["mean"], r["lo"], r["hi"]) == pytest.approx((50.0, 50.0, 50.0))  # exact: same draws
    # a NaN on one side removes the cell from both
    num = 0.5 * den
    num[0, :] = np.nan
    assert paired_ratio_bootstrap(num, den)["mean"] == pytest.approx(0.5)
    assert paired_ratio_bootstrap(num, den)["n_prompts"] == 29


def test_resolution_pools_variances():
    assert resolution([0.3, 0.4]) == pytest.approx(1.959963985 * math.sqrt((0.09 + 0.16) / 2))
    assert resolution([0.3, float("nan")]) == pytest.approx(1.959963985 * 0.3)
    assert math.isnan(resolution([]))
    assert resolution([1.0], alpha=0.1) == pytest.approx(1.644853627)


# ---------------------------------------------------------------------------- equivalence classes


def _artifact(names, cosine, norms):
    return {"names": names, "cosine": cosine, "norm_ratio": [[a / b for b in norms] for a in norms],
            "grad_norms": norms, "run_id": 7}


def test_parallel_pair_gives_a_class_with_its_reason():
    data = _artifact(["rkl", "csd(tau=1.0,w1=S,w2=S)", "kl"],
                     [[1.0, 0.99999, 0.3], [0.99999, 1.0, 0.3], [0.3, 0.3, 1.0]], [0.5, 1.0, 0.8])
    (c,) = equivalence_classes(data)
    assert c["label"] == "∥1" and c["members"] == ["csd(tau=1.0,w1=S,w2=S)", "rkl"] and c["run_id"] == 7
    assert c["reason"] == ("csd(tau=1.0,w1=S,w2=S) ∥ rkl: same direction, gradient ×2.00 — under AdamW at most "
                           "an effective learning-rate factor")
    assert c["pairs"] == [("csd(tau=1.0,w1=S,w2=S)", "rkl", 0.99999, 2.0)]
    assert class_of([c], "rkl") is c and class_of([c], "kl") is None
    # restricted to the settings on a leaderboard: a class needs two members present
    assert equivalence_classes(data, {"rkl", "kl"}) == []


def test_threshold_chains_and_missing_data():
    names = ["a", "b", "c", "d"]
    cos = [[1, 0.99995, 0.99, None], [0.99995, 1, 0.99992, None], [0.99, 0.99992, 1, None], [None, None, None, 1]]
    (c,) = equivalence_classes(_artifact(names, cos, [1.0, 1.0, 4.0, 1.0]))
    assert set(c["members"]) == {"a", "b", "c"} and c["members"][0] == "c"  # a ∥ b ∥ c by a chain of edges
    assert [(p[0], p[1]) for p in c["pairs"]] == [("a", "b"), ("c", "b")]
    assert "×4.00" in c["reason"]
    assert PARALLEL_COSINE == 0.9999
    assert equivalence_classes({"names": ["a", "b"], "cosine": [[1, 0.9998], [0.9998, 1]]}) == []
    assert equivalence_classes(None) == [] and equivalence_classes({"names": []}) == []
    assert pair_reason("x", "y", None) == "x ∥ y: same direction — under AdamW at most an effective learning-rate factor"
