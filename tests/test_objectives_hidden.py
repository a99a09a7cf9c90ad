"""loss_from_hidden: logits made chunk by chunk through the heads == the plain logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from kdbench.registry import compute_from_hidden, loss_from_hidden
from kdbench.registry import get_objective


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest

B, T, D_S, D_T, V = 2, 7, 8, 6, 37


def randn(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture()
def batch():
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) > 0.3
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    return {
        "h_s": randn(B, T, D_S, seed=3),
        "w_s": randn(V, D_S, scale=0.7, seed=4),
        "b_s": randn(V, scale=0.1, seed=5),
        "h_t": randn(B, T, D_T, seed=6),
        "w_t": randn(V, D_T, scale=0.9, seed=7),
        "mask": mask,
        "labels": labels,
    }


def plain(obj, h_s, w_s, b_s, h_t, w_t, mask, labels, vocab_size=None):
    s = F.linear(h_s, w_s, b_s)
    t = F.linear(h_t, w_t)
    return obj(s, t, mask, labels, vocab_size=vocab_size)


@pytest.mark.parametrize("setting", ["csd", "csd_ts", "kl", "rkl", "jsd", "akl", "dld(weight=S)", "ab", "ce"])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_same_value_and_gradients_as_the_logits_path(batch, setting, chunk):
    obj = get_objective(setting)
    grads = []
    for path in ("plain", "hidden"):
        h_s = batch["h_s"].clone().requires_grad_(True)
        head = torch.nn.Linear(D_S, V)
        with torch.no_grad():
            head.weight.copy_(batch["w_s"])
            head.bias.copy_(batch["b_s"])
        if path == "plain":
            loss = plain(obj, h_s, head.weight, head.bias, batch["h_t"], batch["w_t"], batch["mask"], batch["labels"])
        else:
            loss = loss_from_hidden(obj, h_s, head, batch["h_t"], batch["w_t"], batch["mask"], batch["labels"], chunk_size=chunk)
        loss.backward()
        grads.append((loss.detach(), h_s.grad, head.weight.grad, head.bias.grad))
    (l0, gh0, gw0, gb0), (l1, gh1, gw1, gb1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb1, gb0, rtol=1e-4, atol=1e-6)


def test_flat_rows_weight_tensor_head_and_terms(batch):
    obj = get_objective("jeffreys")
    n = B * T
    h_s = batch["h_s"].reshape(n, D_S)
    h_t = batch["h_t"].reshape(n, D_T)
    out = compute_from_hidden(obj, h_s, batch["w_s"], h_t, batch["w_t"], batch["mask"].reshape(n), chunk_size=4)
    ref = obj.compute(h_s @ batch["w_s"].T, h_t @ batch["w_t"].T, batch["mask"].reshape(n))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert out.terms.keys() == ref.terms.keys()
    for k in out.terms:
        torch.testing.assert_close(out.terms[k], ref.terms[k], rtol=1e-5, atol=1e-6)
    # mask=None: every position counts
    full = loss_from_hidden("kl", h_s, batch["w_s"], h_t, batch["w_t"], None, chunk_size=5)
    assert full.item() == pytest.approx(get_objective("kl")(h_s @ batch["w_s"].T, h_t @ batch["w_t"].T, None).item(), rel=1e-5)


def test_padded_heads_are_sliced_to_vocab_size(batch):
    obj = get_objective("csd_us")
    pad_s = torch.cat([batch["w_s"], randn(3, D_S, seed=8)])  # student head padded by 3 rows
    pad_t = torch.cat([batch["w_t"], randn(5, D_T, seed=9)])  # teacher head padded by 5 rows
    ref = plain(obj, batch["h_s"], batch["w_s"], None, batch["h_t"], batch["w_t"], batch["mask"], None)
    w = pad_s.clone().requires_grad_(True)
    got = loss_from_hidden(obj, batch["h_s"], w, batch["h_t"], pad_t, batch["mask"], vocab_size=V, chunk_size=4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    assert bool((w.grad[V:] == 0).all()) and bool((w.grad[:V] != 0).any())
    # the logits path slices the same way
    logits_s = F.linear(batch["h_s"], pad_s)
    logits_t = F.linear(batch["h_t"], pad_t)
    torch.testing.assert_close(obj(logits_s, logits_t, batch["mask"], vocab_size=V), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        loss_from_hidden(obj, batch["h_s"], pad_s, batch["h_t"], pad_t, batch["mask"])
    with pytest.raises(ValueError, match="vocab_size"):
        obj(logits_s, logits_t, batch["mask"])


@pytest.mark.parametrize("name", ["kl", "csd"])
def test_no_positions_by_vocabulary_tensor_is_saved_for_backward(name):
    """kl: each chunk's autograd graph is transient, never more than one chunk of logits;
    csd (closed-form gradient): no autograd graph over logits at all."""
    n, d, v, chunk = 64, 8, 500, 8
    h = randn(n, d, seed=10).requires_grad_(True)
    w = randn(v, d, seed=11).requires_grad_(True)
    h_t, w_t = randn(n, 6, seed=12), randn(v, 6, seed=13)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with saved_tensors_hooks(pack, lambda x: x):
        loss = loss_from_hidden(name, h, w, h_t, w_t, None, chunk_size=chunk)
    if name == "csd":
        assert max(saved, default=0) < chunk * v  # nothing [chunk, V] is even made for autograd
    else:  # nothing larger than one chunk of logits ever exists (the chunk's autograd graph is transient)
        assert saved and max(saved) <= chunk * v < n * v
    loss.backward()
    assert h.grad is not None and w.grad is not None


def test_all_masked_and_errors(batch):
    h_s = batch["h_s"].clone().requires_grad_(True)
    loss = loss_from_hidden("csd", h_s, batch["w_s"], batch["h_t"], batch["w_t"], torch.zeros(B, T, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert bool((h_s.grad == 0).all())
    with pytest.raises(ValueError, match="needs the teacher"):
        loss_from_hidden("kl", batch["h_s"], batch["w_s"], None, None, batch["mask"])
    with pytest.raises(ValueError, match="expects d="):
        loss_from_hidden("kl", batch["h_s"], batch["w_t"], batch["h_t"], batch["w_t"], batch["mask"])
    # ce needs no teacher
    ce = loss_from_hidden("ce", batch["h_s"], batch["w_s"], None, None, batch["mask"], batch["labels"])
    ref = get_objective("ce")(batch["h_s"] @ batch["w_s"].T, None, batch["mask"], batch["labels"])
    assert ce.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_row_blocks_give_the_whole_chunks_values_and_gradient_bitwise(threads):
    """The training path runs each objective's row function on blocks of a few rows
    (kdbench/losses.py blockwise_rows). At a vocabulary width of the micro suites (a multiple of
    the vector length, rows long enough that torch parallelises inside one) every block size --
    including a remainder of one row, which must join the last block -- gives the whole chunk's
    values, terms and gradient to the bit, on one thread and on two."""
    from kdbench.losses import blockwise_rows
    from kdbench.registry import list_objectives

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, v = 7, 49152
        s, t = randn(n, v, scale=3.0, seed=5), randn(n, v, scale=3.0, seed=6)
        y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(7))
        for spec in list_objectives(include_plugins=False):
            obj = get_objective(spec.name)
            values, terms, grad = obj.per_position_grad(s, t, y)  # the whole chunk at once
            for rows in (0, 2, 3, 6):  # 0: the default (5 rows here); 3 and 6 leave one row over
                total, term_sums, g = blockwise_rows(obj.per_position_grad, s, t, y, rows)
                assert torch.equal(total, values.sum()), (spec.name, rows)
                assert torch.equal(g, grad), (spec.name, rows)
                assert all(torch.equal(term_sums[k], terms[k].sum()) for k in terms), (spec.name, rows)
    finally:
        torch.set_num_threads(before)
