"""Numerics of every built-in objective, by property (hypothesis).

The objectives are read from the registry (every built-in name and alias, ``ce`` included), never
listed here. On random logits -- ordinary, extreme (±1e4), mixed magnitudes, near one-hot -- in
float32 / bfloat16 / float16 / float64, with random masks:

* the loss is finite;
* it is ≥ 0 (every built-in is a divergence, a squared error or a negative log-likelihood:
  REFERENCE §1–2; DLD is ½ Σ w (ŝ − t̂)² ≥ 0 too);
* it is 0 when the student equals the teacher (every objective that reads the teacher);
* it does not change when a per-position constant is added to the student's logits, for the
  shift-invariant ones (all that go through softmax; CSD by construction; CE too, since
  logsumexp(s + c) − (s + c)[y] = logsumexp(s) − s[y]) -- not DLD with ``norm=none``;
* positions outside the mask do not change the value, whatever they hold (even NaN).

Examples are few and small (V ≤ 24) and derandomized, so the file is fast and deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdbench.registry import get_objective, list_objectives

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest

PROPS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _settings() -> list[str]:
    """Every built-in objective at its defaults and every alias (different weightings)."""
    names = []
    for spec in list_objectives(include_plugins=False):
        names.append(spec.name)
        names.extend(sorted(spec.aliases))
    return names


SETTINGS = _settings()
# Not shift invariant by design: DLD compares raw logits unless norm=mean/std.
NOT_SHIFT_INVARIANT = {"dld"}
SHIFT_EXTRA = ["dld(norm=mean)", "dld(norm=std)"]  # ... and these two are


def test_the_registry_has_what_the_properties_need():
    assert {"ce", "csd", "csd_ts", "kl", "rkl", "dld", "ab", "akl", "tvd", "jsd"} <= set(SETTINGS)


@st.composite
def logits(draw, *, dtype=None):
    """(s, t, mask, labels): [B, T, V] logits in ``dtype`` and a [B, T] mask."""
    B, T, V = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(2, 24))
    dtype = dtype or draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    mode_s = draw(st.sampled_from(["normal", "large", "extreme", "mixed", "onehot"]))
    mode_t = draw(st.sampled_from(["normal", "large", "extreme", "mixed", "onehot"]))
    g = torch.Generator().manual_seed(seed)

    def make(mode):
        x = torch.randn(B, T, V, generator=g, dtype=torch.float64)
        if mode == "large":
            x = x * 100
        elif mode == "extreme":
            x = torch.where(torch.rand(B, T, V, generator=g) < 0.5, torch.tensor(-1e4), torch.tensor(1e4)).double()
            x = x * torch.rand(B, T, V, generator=g, dtype=torch.float64).round()  # ±1e4 and 0
        elif mode == "mixed":
            scale = torch.tensor([1e-3, 1.0, 30.0, 1e4], dtype=torch.float64)
            x = x * scale[torch.randint(0, 4, (B, T, V), generator=g)]
        elif mode == "onehot":
            x = torch.full((B, T, V), -1e4, dtype=torch.float64)
            x.scatter_(-1, torch.randint(0, V, (B, T, 1), generator=g), 1e4)
        return x.to(dtype)

    mask = torch.rand(B, T, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    labels = torch.randint(0, V, (B, T), generator=g)
    return make(mode_s), make(mode_t), mask, labels


def _loss(name, s, t, mask, labels):
    obj = get_objective(name)
    return obj(s, t if obj.needs_teacher else None, mask, labels if obj.needs_labels else None)


@pytest.mark.parametrize("name", SETTINGS)
@PROPS
@given(data=logits())
def test_finite_and_nonnegative(name, data):
    s, t, mask, labels = data
    loss = _loss(name, s, t, mask, labels).double()
    assert loss.dim() == 0 and math.isfinite(loss.item()), (name, s.dtype, loss)
    assert loss.item() >= -1e-6 * (1 + s.double().abs().max().item() ** 2 * 1e-8), (name, loss.item())
    if not bool(mask.any()):
        assert loss.item() == 0.0  # nothing counted: exactly zero


@pytest.mark.parametrize("name", [n for n in SETTINGS if get_objective(n).needs_teacher])
@PROPS
@given(data=logits())
def test_zero_when_student_equals_teacher(name, data):
    s, _, mask, labels = data
    loss = _loss(name, s, s.clone(), mask, labels).double().item()
    assert math.isfinite(loss) and abs(loss) <= 1e-5, (name, s.dtype, loss)


@pytest.mark.parametrize("name", [n for n in SETTINGS if n not in NOT_SHIFT_INVARIANT] + SHIFT_EXTRA)
@PROPS
@given(data=logits(dtype=torch.float64), shift=st.sampled_from([-1e3, -7.5, 0.5, 42.0, 1e3]),
       per_position=st.booleans())
def test_shift_invariance(name, data, shift, per_position):
    s, t, mask, labels = data
    c = torch.full(s.shape[:-1] + (1,), shift, dtype=s.dtype)
    if per_position:
        c = c * torch.linspace(-1, 1, c.numel(), dtype=s.dtype).reshape(c.shape)
    a = _loss(name, s, t, mask, labels).item()
    b = _loss(name, s + c, t, mask, labels).item()
    assert b == pytest.approx(a, rel=1e-6, abs=1e-6), (name, a, b)


def test_dld_without_normalisation_is_not_shift_invariant():
    s, t = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    assert _loss("dld", s + 5.0, t, None, None).item() != pytest.approx(_loss("dld", s, t, None, None).item())


@pytest.mark.parametrize("name", SETTINGS)
@PROPS
@given(data=logits(), garbage=st.sampled_from(["extreme", "nan", "inf"]))
def test_masked_positions_do_not_affect_the_value(name, data, garbage):
    s, t, mask, labels = data
    s2, t2, labels2 = s.clone(), t.clone(), labels.clone()
    hidden = ~mask
    value = {"extreme": 3e4 if s.dtype != torch.float16 else 6e4, "nan": float("nan"), "inf": float("inf")}[garbage]
    s2[hidden] = value
    t2[hidden] = -value
    labels2[hidden] = 0
    a = _loss(name, s, t, mask, labels)
    b = _loss(name, s2, t2, mask, labels2)
    assert torch.equal(a, b) or (a.item() == pytest.approx(b.item(), rel=1e-6, abs=1e-7)), (name, a, b)
