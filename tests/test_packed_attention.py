"""Per-sequence attention for packed rows (kdbench/modeling.py ``packed_attention``): SDPA run once
per sequence, causal, without the L × L block-diagonal mask transformers builds for a packed row.
Its hidden states and gradients equal the dense-mask path's (float32, 1e-5 relative) for a Llama
(grouped-query attention, rotary positions) and a GPT-2 (learned positions), with and without
activation checkpointing and under bf16 autocast; a switched model still runs padded and cached
forwards exactly as SDPA does, and comes back as it came."""

from __future__ import annotations

import copy

import pytest
import torch

from kdbench.data.batching import Encoded, pack
from kdbench.modeling import (PER_SEQUENCE_ATTENTION, final_hidden, packed_attention, sequence_bounds,
                              set_activation_checkpointing, supports_per_sequence)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = (7, 13, 5, 10, 3)   # five sequences of different lengths in one packed row
VOCAB = 97
RTOL = 1e-5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _batch(lengths=LENGTHS):
    g = torch.Generator().manual_seed(1)
    enc = [Encoded(torch.randint(0, VOCAB, (n,), generator=g).tolist(), max(1, n // 3)) for n in lengths]
    return pack(enc, [f"s{i}" for i in range(len(enc))])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _hidden_and_grads(model, batch, mode, *, checkpointing=False, bf16=False):
    """Final hidden states at the counted positions and the gradients of a fixed function of them."""
    model.train()
    set_activation_checkpointing(model, checkpointing)
    model.zero_grad(set_to_none=True)
    with packed_attention(model, mode) as used:
        assert used == mode
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = final_hidden(model, batch)
        probe = torch.linspace(-1, 1, h.numel()).reshape(h.shape)
        (h.float() * probe).sum().backward()
    set_activation_checkpointing(model, False)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach().float(), grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["activations-kept", "checkpointing"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_per_sequence_equals_the_dense_mask_in_float32(kind, checkpointing):
    model = MODELS[kind]()
    batch = _batch()
    h_dense, g_dense = _hidden_and_grads(model, batch, "dense", checkpointing=checkpointing)
    h_seq, g_seq = _hidden_and_grads(model, batch, "per_sequence", checkpointing=checkpointing)
    assert h_seq.shape == h_dense.shape == (batch.n_counted, 32)
    assert _rel(h_seq, h_dense) <= RTOL
    assert g_seq.keys() == g_dense.keys() and len(g_dense) == len(list(model.base_model.parameters()))
    worst = max(_rel(g_seq[n], g_dense[n]) for n in g_dense)
    assert worst <= RTOL, worst


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_per_sequence_equals_each_sequence_alone(kind):
    """The packed row's per-sequence hidden states are those of each sequence run by itself."""
    model = MODELS[kind]().eval()
    batch = _batch()
    with torch.no_grad(), packed_attention(model, "per_sequence"):
        packed = final_hidden(model, batch)
        alone = torch.cat([final_hidden(model, pack([e], ["x"])) for e in batch.encoded])
    assert _rel(packed, alone) <= RTOL


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_per_sequence_under_bf16_autocast_and_checkpointing(kind):
    """bf16 autocast: both paths round q, k, v to bf16; they agree to bf16's precision."""
    model = MODELS[kind]()
    batch = _batch()
    h_dense, g_dense = _hidden_and_grads(model, batch, "dense", checkpointing=True, bf16=True)
    h_seq, g_seq = _hidden_and_grads(model, batch, "per_sequence", checkpointing=True, bf16=True)
    assert torch.isfinite(h_seq).all() and _rel(h_seq, h_dense) <= 2e-2
    assert max(_rel(g_seq[n], g_dense[n]) for n in g_dense) <= 5e-2


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_switched_model_runs_padded_and_cached_forwards_as_sdpa_does_and_comes_back(kind):
    """Validation decodes with a padding mask and a KV cache while training has the model
    switched: those calls are SDPA's own, bit for bit. On exit the model is as it came."""
    model = MODELS[kind]().eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_cached = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        ref_next = model(input_ids=ids[:, 5:6], attention_mask=mask[:, :6], cache=ref_cached.cache,
                         use_cache=True).logits
        assert model.config._attn_implementation == "sdpa"
        with packed_attention(model, "per_sequence"):
            assert model.config._attn_implementation == PER_SEQUENCE_ATTENTION
            got = model(input_ids=ids, attention_mask=mask).logits
            cached = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
            got_next = model(input_ids=ids[:, 5:6], attention_mask=mask[:, :6],
                             cache=cached.cache, use_cache=True).logits
        assert model.config._attn_implementation == "sdpa"
    assert cached.cache is not None and cached.cache.get_seq_length() == 6
    assert torch.equal(got, ref) and torch.equal(got_next, ref_next)


def test_the_model_comes_back_when_the_block_raises():
    model = _llama()
    with pytest.raises(RuntimeError, match="boom"), packed_attention(model, "per_sequence"):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_a_model_with_a_sliding_window_stays_dense():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=4))
    assert not supports_per_sequence(model) and supports_per_sequence(_llama()) and supports_per_sequence(_gpt2())
    with packed_attention(model, "per_sequence") as used:
        assert used == "dense" and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="packed attention must be one of"), packed_attention(model, "flash"):
        pass


def test_sequence_bounds_from_the_encoded_lengths_or_the_positions():
    batch = _batch()
    expected = [0, 7, 20, 25, 35, 38]
    assert sequence_bounds(batch).reshape(-1).tolist() == expected
    assert sequence_bounds(batch).shape == (1, 1, 1, 6) and sequence_bounds(batch).device.type == "cpu"
    bare = copy.copy(batch)
    bare.encoded = []  # a batch made without its encoded examples: the restarting positions say it
    assert sequence_bounds(bare).reshape(-1).tolist() == expected
    one = _batch((9,))
    assert sequence_bounds(one).reshape(-1).tolist() == [0, 9]
