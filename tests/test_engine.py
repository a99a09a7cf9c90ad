"""The engine: packed batches, the hidden-state training path and the start-up check (the loop
and its state: tests/test_trainer.py). Tiny random Llama models with the real SmolLM2
tokenizer (tests/engine_helpers.py) and real chatterbot-corpus examples keep it to seconds."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch

from kdbench.data.batching import collate, pack
from kdbench.engine.batches import PackedBatches
from kdbench.engine.check import FastPathMismatch, startup_check
from kdbench.engine.teacher import LiveTeacher
from kdbench.modeling import final_hidden, head_logits_check, output_head
from kdbench.registry import get_objective, list_objectives, load_plugin_file

try:
    from tests.engine_helpers import fresh, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import fresh, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- packed batches


def test_packed_hidden_states_equal_per_sequence_ones(tiny):
    model = tiny["teacher"]
    items = tiny["enc"][:5]
    batch = pack([e for _, e in items], [i for i, _ in items])
    packed = final_hidden(model, batch)
    one_by_one = torch.cat([final_hidden(model, pack([e], [i])) for i, e in items])
    torch.testing.assert_close(packed, one_by_one, rtol=1e-4, atol=1e-5)
    # and the padded landed layout selects the same rows and labels
    padded = collate([e for _, e in items], tiny["tok"].pad_token_id)
    h = model.base_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
    torch.testing.assert_close(h[padded["loss_mask"]], packed, rtol=1e-4, atol=1e-5)
    assert torch.equal(padded["labels"][padded["loss_mask"]], batch.labels)
    assert batch.n_tokens == int(padded["attention_mask"].sum())  # no padding in a packed batch


def test_batch_order_is_fixed_per_seed_and_the_cursor_resumes(tiny):
    enc = tiny["enc"]
    a = PackedBatches(enc, 4, seed=3)
    first = [next(a).example_ids for _ in range(8)]  # crosses an epoch (6 batches per epoch)
    again = PackedBatches(enc, 4, seed=3)
    assert [next(again).example_ids for _ in range(8)] == first
    assert [next(PackedBatches(enc, 4, seed=4)).example_ids] != first[:1]
    b = PackedBatches(enc, 4, seed=3)
    for _ in range(5):
        next(b)
    cursor = b.state_dict()
    c = PackedBatches(enc, 4, seed=3)
    c.load_state_dict(cursor)
    assert [next(c).example_ids for _ in range(3)] == first[5:8]
    assert a.describe()["epoch0_order_sha256"] == again.describe()["epoch0_order_sha256"]
    with pytest.raises(ValueError, match="does not belong"):
        PackedBatches(enc, 4, seed=9).load_state_dict(cursor)
    with pytest.raises(ValueError, match="unique"):
        PackedBatches(enc + enc[:1], 4, seed=0)


# --------------------------------------------------------------------------- fast path == dense path


def _fast_and_dense(obj, h, w, th, tw, labels, chunk):
    outs = []
    for path in ("dense", "fast"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if path == "dense":
            loss = obj.compute(torch.nn.functional.linear(hh.float(), ww), None if th is None else
                               torch.nn.functional.linear(th.float(), tw), None, labels).loss
        else:
            loss = obj.from_hidden(hh, ww, th, tw, labels=labels, chunk_size=chunk).loss
        loss.backward()
        outs.append((loss.detach(), hh.grad, ww.grad))
    return outs


@pytest.mark.parametrize("name", sorted(s.name for s in list_objectives(include_plugins=False)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_dense_path_for_every_objective(name, dtype):
    g = torch.Generator().manual_seed(0)
    n, d, v = 13, 8, 37
    h = torch.randn(n, d, generator=g).to(dtype)
    th = torch.randn(n, d, generator=g).to(dtype)
    w, tw = torch.randn(v, d, generator=g) * 0.7, torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    obj = get_objective(name)
    (l0, gh0, gw0), (l1, gh1, gw1) = _fast_and_dense(obj, h, w, th, tw, labels, chunk=4)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert gh1.dtype == dtype  # gradients come back in the hidden states' dtype
    # bf16 gradients: both paths round the same float32 gradient to bf16, one ulp apart at most
    bf16 = dtype == torch.bfloat16
    torch.testing.assert_close(gh1.float(), gh0.float(), rtol=2e-2 if bf16 else 1e-4, atol=2e-3 if bf16 else 1e-5)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)


def test_fast_path_for_a_plugin_objective(tmp_path):
    path = tmp_path / "plug.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("plug_sq", behaviour="balanced", paper="test plug-in")
        def plug_sq(s, t):
            """Squared probability gap."""
            return ((s.softmax(-1) - t.softmax(-1)) ** 2).sum(-1)
    '''))
    (spec,) = load_plugin_file(path)
    g = torch.Generator().manual_seed(1)
    h, th, w, tw = (torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g), torch.randn(21, 6, generator=g),
                    torch.randn(21, 6, generator=g))
    (l0, gh0, gw0), (l1, gh1, gw1) = _fast_and_dense(get_objective(spec), h, w, th, tw, None, chunk=2)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- the start-up check


@pytest.mark.parametrize("name", ["kl", "csd", "csd_ts", "ce", "akl", "jsd"])
def test_startup_check_passes_on_real_batches(tiny, name):
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    res = startup_check(fresh(tiny), get_objective(name), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)
    assert res.passed and res.positions == batch.n_counted
    # well inside the check's tolerances (1e-5 / 1e-4); measured up to 1.8e-6 for kl on an AVX-512 CPU
    assert res.value_rel_err < 5e-6 and max(res.grad_hidden_rel_err, res.grad_head_rel_err) < 1e-5
    assert res.loss_fast == pytest.approx(res.loss_dense, rel=5e-6)


def test_startup_check_refuses_an_objective_whose_rows_are_not_independent(tiny, tmp_path):
    path = tmp_path / "coupled.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("row_coupled", behaviour="balanced", paper="test plug-in")
        def row_coupled(s, t):
            """Normalised by the rows it sees: chunking changes the value."""
            per = (s.log_softmax(-1) - t.log_softmax(-1)).pow(2).sum(-1)
            return per / per.detach().mean()
    '''))
    (spec,) = load_plugin_file(path)
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    with pytest.raises(FastPathMismatch, match=r"refused objective row_coupled.*gives loss .*dense reference"):
        startup_check(fresh(tiny), get_objective(spec), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)


def test_startup_check_refuses_a_wrong_fast_path(tiny, monkeypatch):
    """A deliberately broken training path (positions shifted by one) is caught before training."""
    from kdbench.engine import check as C

    real = C.final_hidden

    def shifted(model, batch):
        h = real(model, batch)
        return torch.roll(h, 1, 0)

    monkeypatch.setattr(C, "final_hidden", shifted)
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    with pytest.raises(FastPathMismatch, match="refused objective kl"):
        startup_check(fresh(tiny), get_objective("kl"), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)


def test_head_check_catches_a_non_linear_head(tiny):
    model = copy.deepcopy(tiny["teacher"])
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    h = final_hidden(model, batch)
    assert head_logits_check(model, batch, h)["rel_err"] < 1e-5
    head = output_head(model)
    model.lm_head = torch.nn.Sequential()  # a head that is not the weight's linear map
    model.lm_head.weight = head.weight
    model.get_output_embeddings = lambda: head
    cap = 0.5 * float(torch.nn.functional.linear(h, head.weight).abs().max())
    model.lm_head.forward = lambda x: cap * torch.tanh(head(x) / cap)  # soft-capping, as Gemma 2 does
    assert head_logits_check(model, batch, h)["rel_err"] > 1e-2
    model.lm_head.forward = lambda x: 1.05 * head(x)  # a logit scale
    assert head_logits_check(model, batch, h)["rel_err"] > 1e-2


def test_startup_check_refuses_a_wrong_declared_gradient(tiny, tmp_path):
    """A plug-in's closed-form gradient replaces autograd in training; a wrong one (here: the
    reverse KL gradient with the sign flipped) is refused before the first step."""
    path = tmp_path / "wrong_grad.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        def flipped(s, t):
            ls, lt = s.log_softmax(-1), t.log_softmax(-1)
            p = ls.exp()
            per = (p * (ls - lt)).sum(-1)
            return per, {}, -(p * ((ls - lt) - per.unsqueeze(-1)))

        @objective("rkl_flipped", behaviour="mode-seeking", paper="test plug-in", gradient=flipped)
        def rkl_flipped(s, t):
            """Reverse KL with a wrong declared gradient."""
            ls, lt = s.log_softmax(-1), t.log_softmax(-1)
            return (ls.exp() * (ls - lt)).sum(-1)
    '''))
    (spec,) = load_plugin_file(path)
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    with pytest.raises(FastPathMismatch, match=r"refused objective rkl_flipped.*gradient mismatch"):
        startup_check(fresh(tiny), get_objective(spec), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)
    # the same plug-in with the right sign passes: the check is about the gradient, nothing else
    right = tmp_path / "right_grad.py"
    right.write_text(path.read_text().replace("return per, {}, -(p", "return per, {}, (p").replace(
        '"rkl_flipped"', '"rkl_closed"'))
    (spec,) = load_plugin_file(right)
    assert startup_check(fresh(tiny), get_objective(spec), batch, LiveTeacher(tiny["teacher"]), chunk_size=256).passed
