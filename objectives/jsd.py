"""Generalised Jensen–Shannon divergence, normalised so that β → 0 / 1 give forward / reverse KL."""

from kdbench.numerics import scaled_kl_to_mixture
from kdbench.registry import Param, objective


@objective(
    "jsd",
    behaviour="balanced",
    paper="Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from Self-Generated "
    "Mistakes (GKD), arXiv:2306.13649",
    params=[
        Param(
            "beta",
            float,
            0.5,
            doc="mixture weight β of the teacher in m = β·p + (1−β)·q; 0 → forward KL, 1 → reverse KL. "
            "β = 0 exactly or β ≥ 1e-30: KL(q‖m)/β divides float32 values by β, which overflows below "
            "(NaN gradients at β = 1e-34 for logits of magnitude 1e4, at step 1)",
            min=1e-30,
            max=1.0,
            also=(0.0,),
        )
    ],
)
def jsd(s, t, *, beta):
    """Generalised JSD(β), divided by β(1−β): continuous from forward KL (β=0) to reverse KL (β=1).

    m = β·p + (1−β)·q,   p = softmax(t) (teacher), q = softmax(s) (student)
    JSD_β(p, q) = [ β·KL(p‖m) + (1−β)·KL(q‖m) ] / (β·(1−β))
                = KL(p‖m)/(1−β) + KL(q‖m)/β
    Convention: the unnormalised bracket tends to 0 at both ends (a useless objective there),
    so kdbench divides by β(1−β); then β → 0 gives KL(p‖q) and β → 1 gives KL(q‖p) exactly,
    and jsd(beta=0.5) = 4 × the textbook JS divergence (≤ 4·log 2). Computed without
    cancellation for β near 0 or 1 (no special-casing jump). terms: kl_p_m = KL(p‖m),
    kl_q_m = KL(q‖m), unnormalised = β·KL(p‖m) + (1−β)·KL(q‖m).
    """
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    a = scaled_kl_to_mixture(lp, lq, 1.0 - beta)  # KL(p‖m)/(1−β)
    b = scaled_kl_to_mixture(lq, lp, beta)  # KL(q‖m)/β
    kl_p_m, kl_q_m = (1.0 - beta) * a, beta * b
    return a + b, {"kl_p_m": kl_p_m, "kl_q_m": kl_q_m, "unnormalised": beta * kl_p_m + (1.0 - beta) * kl_q_m}
