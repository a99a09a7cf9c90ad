"""The step's settings per device (kdbench/engine/tuning.py): on the CPU today's constants and
bitwise today's training; on CUDA one row block per chunk, larger chunks, per-sequence packed
attention and activation checkpointing chosen from a memory estimate (checked here with the
memory given as numbers, or the CUDA memory query monkeypatched); the user's overrides win. And
the step's one host synchronisation: a NaN loss still stops the run at its step, before any
optimiser step."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from kdbench import losses
from kdbench.engine import tuning as T
from kdbench.engine.batches import PackedBatches
from kdbench.engine.teacher import LiveTeacher
from kdbench.engine.trainer import TrainingDiverged, train
from kdbench.engine.tuning import StepTuning, step_tuning
from kdbench.registry import get_objective, load_plugin_file
from kdbench.suites import TrainSpec

try:
    from tests.engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CUDA = torch.device("cuda")


# --------------------------------------------------------------------------- the CPU: today's values


def test_the_cpu_gets_todays_constants(monkeypatch):
    monkeypatch.delenv(T.CHECKPOINTING_ENV, raising=False)
    t = step_tuning(torch.device("cpu"))
    assert t == StepTuning(256, 1 << 20, T.ACTIVATION_CHECKPOINTING, "dense")
    assert (t.chunk_size, t.row_block_bytes) == (losses.HIDDEN_CHUNK_SIZE, losses.ROW_BLOCK_BYTES)
    assert step_tuning("cpu", activation_checkpointing=False).activation_checkpointing is False  # --keep-activations
    monkeypatch.setenv(T.CHECKPOINTING_ENV, "0")
    assert step_tuning("cpu").activation_checkpointing is False
    monkeypatch.setenv(T.CHECKPOINTING_ENV, "1")
    assert step_tuning("cpu").activation_checkpointing is True
    assert StepTuning.from_dict(t.to_dict()) == t and t.to_dict()["reason"] == "cpu default"


def _run(tiny, steps=3, objective="csd", **kw):
    spec = dataclasses.replace(SPEC, steps=steps)
    model, seen = fresh(tiny), []
    res = train(model=model, objective=get_objective(objective), batches=PackedBatches(tiny["enc"], 4, 0),
                teacher=LiveTeacher(tiny["teacher"]), spec=spec, device=torch.device("cpu"),
                hooks=Hooks(log=lambda s, p: seen.append((p["loss"], p["terms"]))), progress=False, **kw)
    return seen, [p.detach().clone() for p in model.parameters()], res


@pytest.mark.parametrize("objective", ["csd", "kl"])
def test_training_with_the_cpu_tuning_passed_is_bitwise_training_without(tiny, objective):
    base, w0, res = _run(tiny, objective=objective)
    for tuning in (step_tuning("cpu"), StepTuning(256, 1 << 20, T.ACTIVATION_CHECKPOINTING, "dense")):
        again, w1, _ = _run(tiny, objective=objective, tuning=tuning)
        assert again == base  # losses and terms, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert res.step_tuning == step_tuning("cpu").to_dict()


def test_per_sequence_attention_trains_like_the_dense_mask_and_hands_the_models_back(tiny):
    dense, _, _ = _run(tiny, objective="kl", steps=2)
    tuned = dataclasses.replace(step_tuning("cpu"), packed_attention="per_sequence")
    seq, _, res = _run(tiny, objective="kl", steps=2, tuning=tuned)
    assert [a for a, _ in seq] == pytest.approx([a for a, _ in dense], rel=1e-5)
    assert res.step_tuning["packed_attention"] == "per_sequence"
    assert tiny["teacher"].config._attn_implementation == "sdpa"  # the live teacher ran per sequence too


def test_the_row_block_size_is_a_parameter():
    """One block per chunk (a GPU's setting) gives the chunk's values; the default runs 1 MB blocks."""
    torch.manual_seed(0)
    n, v = 12, 65536  # the default block: 1 MB / (65,536 x 4 bytes) = 4 rows
    s, t = torch.randn(n, v), torch.randn(n, v)
    obj = get_objective("kl")
    calls = []

    def per_row(sb, tb, yb):
        calls.append(sb.shape[0])
        return obj.per_position_grad(sb, tb, yb)

    blocks = losses.blockwise_rows(per_row, s, t, None)
    assert calls == [4, 4, 4]
    calls.clear()
    whole = losses.blockwise_rows(per_row, s, t, None, block_bytes=n * v * 4)
    assert calls == [n]
    calls.clear()
    halves = losses.blockwise_rows(per_row, s, t, None, block_bytes=6 * v * 4)
    assert calls == [6, 6]
    for got in (whole, halves):
        assert torch.allclose(got[0], blocks[0], rtol=1e-6) and torch.allclose(got[2], blocks[2], rtol=1e-6, atol=1e-12)
    h, w, th, tw = torch.randn(n, 16), torch.randn(v, 16), torch.randn(n, 16), torch.randn(v, 16)
    a = obj.from_hidden(h, w, th, tw, row_block_bytes=n * v * 4).loss
    b = obj.from_hidden(h, w, th, tw).loss
    assert torch.allclose(a, b, rtol=1e-6)


def test_a_nan_loss_stops_the_run_at_its_step_before_any_optimiser_step(tiny, tmp_path):
    path = tmp_path / "always_nan.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("always_nan_tuning", behaviour="balanced", paper="test plug-in")
        def always_nan_tuning(s, t):
            """NaN everywhere."""
            return (s - t).sum(-1) * float("nan")
    '''))
    (spec,) = load_plugin_file(path)
    model = fresh(tiny)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at step 1$"):
        train(model=model, objective=get_objective(spec.name), batches=PackedBatches(tiny["enc"], 4, 0),
              teacher=LiveTeacher(tiny["teacher"]), spec=SPEC, device=torch.device("cpu"), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # handed back


# --------------------------------------------------------------------------- CUDA: chosen, from numbers


def _student():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


GPU_SPEC = TrainSpec(steps=10, batch_size=8, max_tokens=128, bf16_autocast=True)


def test_the_memory_estimate_from_numbers():
    e = T.estimate_memory(params=1000, layers=2, hidden=8, intermediate=32, vocab=100, tokens=50, chunk_size=2048,
                          compute_bytes=2, available=10**9, teacher_hidden=16)
    assert e.state == 16_000
    assert e.activations == 2 * 50 * (2 * (16 * 8 + 5 * 32) + 4 * 2 * 8)
    assert e.checkpointed == 2 * 50 * 4 * 8
    assert e.loss == 6 * 50 * 100 * 4 + 50 * 16 * 4  # a chunk no longer than the row
    assert e.with_activations == e.state + e.activations + e.loss and e.fits
    # GPT-2 base (124 M parameters) on packed rows of 8 x 512 tokens, bf16, with a GPT-2 XL teacher: ~7 GiB
    gpt2 = T.estimate_memory(params=124_439_808, layers=12, hidden=768, intermediate=3072, vocab=50257, tokens=4096,
                             chunk_size=2048, compute_bytes=2, available=79 * 2**30, teacher_hidden=1600)
    assert 6 * 2**30 < gpt2.with_activations < 8 * 2**30 and gpt2.fits
    assert not dataclasses.replace(gpt2, available=8 * 2**30).fits


def test_cuda_settings_and_checkpointing_from_the_memory_estimate(monkeypatch):
    monkeypatch.delenv(T.CHECKPOINTING_ENV, raising=False)
    monkeypatch.setattr(T, "native_bf16", lambda device: True)
    model = _student()
    shape = T.model_shape(model)
    assert shape == {"params": sum(p.numel() for p in model.parameters()), "layers": 3, "hidden": 64,
                     "intermediate": 160, "vocab": 512}
    need = T.estimate_memory(**shape, tokens=8 * 128, chunk_size=T.CUDA_CHUNK_SIZE, compute_bytes=2,
                             available=0).with_activations
    roomy = step_tuning(CUDA, model=model, spec=GPU_SPEC, available=10 * need)
    assert roomy == StepTuning(T.CUDA_CHUNK_SIZE, T.CUDA_CHUNK_SIZE * 512 * 4, False, "per_sequence")
    assert "off" in roomy.reason
    edge = int(need / T.CUDA_MEMORY_FRACTION) + 1
    assert step_tuning(CUDA, model=model, spec=GPU_SPEC, available=edge).activation_checkpointing is False
    tight = step_tuning(CUDA, model=model, spec=GPU_SPEC, available=edge - 2)
    assert tight.activation_checkpointing is True and "on" in tight.reason
    # the user's choice wins: --keep-activations, then the environment variable
    assert step_tuning(CUDA, model=model, spec=GPU_SPEC, available=1, activation_checkpointing=False) \
        .activation_checkpointing is False
    monkeypatch.setenv(T.CHECKPOINTING_ENV, "0")
    assert step_tuning(CUDA, model=model, spec=GPU_SPEC, available=1).activation_checkpointing is False
    monkeypatch.setenv(T.CHECKPOINTING_ENV, "1")
    assert step_tuning(CUDA, model=model, spec=GPU_SPEC, available=10 * need).activation_checkpointing is True
    monkeypatch.delenv(T.CHECKPOINTING_ENV)
    # nothing to estimate from: on; a model per-sequence attention cannot serve: dense
    assert step_tuning(CUDA).activation_checkpointing is True
    assert step_tuning(CUDA).row_block_bytes == T.CUDA_CHUNK_SIZE * T.MAX_VOCAB * 4
    model.config._attn_implementation_internal = "eager"
    assert step_tuning(CUDA, model=model, spec=GPU_SPEC, available=10 * need).packed_attention == "dense"


def test_the_cuda_memory_query(monkeypatch):
    """``available_memory`` adds mem_get_info's free bytes, the allocator's unused cached blocks
    and the student's weights already on the device; step_tuning asks it when given no number."""
    monkeypatch.delenv(T.CHECKPOINTING_ENV, raising=False)
    monkeypatch.setattr(T, "native_bf16", lambda device: True)
    model = _student()
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    free["bytes"] = 5000
    assert T.available_memory(CUDA, model) == 5000 + 2000  # the weights are on the CPU here: not resident
    free["bytes"] = 80 * 2**30
    assert step_tuning(CUDA, model=model, spec=GPU_SPEC).activation_checkpointing is False
    free["bytes"] = 2**20
    assert step_tuning(CUDA, model=model, spec=GPU_SPEC).activation_checkpointing is True
