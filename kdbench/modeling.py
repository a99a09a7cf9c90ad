"""Model plumbing that training and evaluation share: final hidden states at counted positions,
the output head, and the student as data-parallel wrappers need it.

Training never asks a model for logits: it takes the **final hidden states** (the output
head's input, after the last norm) at the batch's counted positions and the objective makes
logits from them chunk by chunk (kdbench/losses.py); evaluation decodes and scores the same way
(kdbench/evaluation/sampling.py). That is only the model's own output if its head is a plain
linear map of those states; :func:`head_logits_check` verifies it against the model's own
logits (a head with soft-capping or a logit scale would fail it).

:func:`head_params` is the one way to an output head's ``(weight, bias)``, whatever holds it (a
causal LM, a head module, a teacher source, a bare weight); :func:`output_head` is the head
*module* of a causal LM (whose parameters the optimiser trains).
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import contextmanager

import torch
from torch import Tensor

from kdbench.data.batching import Batch
from kdbench.device import autocast_context

#: How attention keeps a packed row's sequences apart (:func:`packed_attention`):
#:
#: * ``"dense"``: transformers' SDPA with the block-diagonal L × L mask it builds from the
#:   restarting ``position_ids`` (a masked kernel over the whole row, and a host synchronisation to
#:   detect the packing). The CPU's, and what every stored result was made with;
#: * ``"per_sequence"``: SDPA once per sequence, causal, without a mask (:func:`per_sequence_attention`):
#:   no L × L mask, and on CUDA the flash / memory-efficient kernels that a mask rules out.
PACKED_ATTENTION = ("dense", "per_sequence")
#: The name :func:`per_sequence_attention` is registered under in transformers' ``AttentionInterface``
#: (and SDPA's mask function under in its ``AttentionMaskInterface``).
PER_SEQUENCE_ATTENTION = "kdbench_per_sequence"


def final_hidden(model, batch: Batch) -> Tensor:
    """``[N, d]`` final hidden states at ``batch.counted``. Packed sequences stay independent:
    ``position_ids`` restart per sequence and, with no attention mask and no cache,
    transformers masks attention per sequence. A model switched to per-sequence attention
    (:func:`packed_attention`) is handed the row's sequence boundaries instead
    (:func:`sequence_bounds`) and builds no mask.

    ``model`` is a causal LM, a :class:`StudentBody`, or a wrapper around one (DDP,
    ``accelerate``'s prepared module): the call then goes through the wrapper's forward."""
    if isinstance(model, StudentBody) or isinstance(getattr(model, "module", None), StudentBody):
        return model(batch)
    if isinstance(getattr(model, "module", None), torch.nn.Module):
        raise TypeError(f"{type(model).__name__} wraps a {type(model.module).__name__}: wrap "
                        "kdbench.modeling.StudentBody(model) instead, so that the forward the wrapper "
                        "hooks (DDP's gradient all-reduce) is the one training calls")
    kwargs = {}
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == PER_SEQUENCE_ATTENTION:
        kwargs["attention_mask"] = sequence_bounds(batch)
    out = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    h = out.last_hidden_state
    return h.reshape(-1, h.shape[-1]).index_select(0, batch.counted)


# ---------------------------------------------------------------------------------------------
# Per-sequence attention for packed rows
# ---------------------------------------------------------------------------------------------


def sequence_bounds(batch: Batch) -> Tensor:
    """Where each sequence of the packed row starts, and the row's length: ``[0, l_1, l_1 + l_2,
    …, L]`` as a ``[1, 1, 1, n + 1]`` int64 tensor on the CPU. It travels to
    :func:`per_sequence_attention` in the ``attention_mask`` argument: transformers hands a 4-D
    mask to the attention layers as it is, without building one of its own, and keeps it among
    the block's inputs that activation checkpointing replays. From the batch's encoded lengths
    (host values: reading them never waits for the device); a batch whose lengths do not add up
    to its row falls back on its ``position_ids`` (a sequence starts at position 0)."""
    length = batch.input_ids.shape[-1]
    bounds = [0, *itertools.accumulate(len(e.ids) for e in batch.encoded)]
    if bounds[-1] != length or batch.input_ids.shape[0] != 1:
        starts = (batch.position_ids.reshape(-1) == 0).nonzero().reshape(-1).tolist()
        bounds = sorted({0, *starts}) + [length]
    return torch.tensor(bounds, dtype=torch.long).view(1, 1, 1, -1)


def per_sequence_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """transformers' SDPA attention (``integrations/sdpa_attention.py``), run once per packed
    sequence when ``attention_mask`` is :func:`sequence_bounds`'s integer tensor: each sequence
    causal (``is_causal``), without a mask, so CUDA runs a flash or memory-efficient kernel on it
    and nothing L × L is made. Any other call (a boolean or float mask: padding, a KV cache; or
    none) is SDPA's own, unchanged, so a model left switched still decodes and evaluates exactly
    as under ``"sdpa"``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or attention_mask.is_floating_point() or attention_mask.dtype == torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = attention_mask.reshape(-1).tolist()
    length = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != length or bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(f"per-sequence attention takes one packed row without a cache; got queries "
                         f"{tuple(query.shape)}, keys {tuple(key.shape)}, sequence bounds {bounds[:4]}…{bounds[-1:]}")
    if len(bounds) == 2:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1), None  # [1, L, heads, head_dim], as SDPA returns it


_REGISTERED = False


def _register_per_sequence() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(PER_SEQUENCE_ATTENTION, per_sequence_attention)
        AttentionMaskInterface.register(PER_SEQUENCE_ATTENTION, sdpa_mask)  # padded / cached forwards: SDPA's masks
        _REGISTERED = True


def supports_per_sequence(model) -> bool:
    """Whether ``model`` (a causal LM) can run :func:`per_sequence_attention`: a transformers model
    on SDPA that sets its attention through ``AttentionInterface``, every layer full causal
    attention (a sliding window or chunked attention would need its own mask per sequence), and
    no sub-models (multimodal masks)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", PER_SEQUENCE_ATTENTION):
        return False
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return False
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "sub_configs", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        if any(t != "full_attention" for t in layer_types):
            return False
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return not getattr(config, "attention_chunk_size", None)


@contextmanager
def packed_attention(model, mode: str):
    """Within the block, ``model`` (a causal LM or a wrapper around one) keeps its packed
    sequences apart by ``mode`` (:data:`PACKED_ATTENTION`); yields the mode in effect:
    ``"per_sequence"`` falls back on ``"dense"`` for a model that cannot run it
    (:func:`supports_per_sequence`). The model's own attention implementation comes back on exit.
    Hidden states and gradients equal the dense path's up to float rounding
    (tests/test_packed_attention.py), so switching changes a run's numbers in their last bits only."""
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"packed attention must be one of {PACKED_ATTENTION}, got {mode!r}")
    lm = unwrap(model)
    if mode == "dense" or not supports_per_sequence(lm):
        yield "dense"
        return
    _register_per_sequence()
    before = lm.config._attn_implementation
    lm.set_attn_implementation(PER_SEQUENCE_ATTENTION)
    try:
        yield "per_sequence"
    finally:
        lm.set_attn_implementation(before)


class StudentBody(torch.nn.Module):
    """The student as the trainer calls it: ``forward(batch)`` is :func:`final_hidden` of the
    causal LM it holds. It exists for data-parallel training: DDP (and so ``accelerate``) arms
    its gradient all-reduce in the wrapped module's *forward* and hooks the wrapped module's
    *parameters*, but training never calls the LM's own forward (no logits) and uses its output
    head outside any forward (the objective makes logits per chunk). Wrapping this module, which
    owns the whole LM, head included, puts both under the wrapper: ``DDP(StudentBody(lm))``
    given to ``train(model=...)`` averages every gradient across ranks (tests/test_data_parallel.py,
    two real processes). Single-process runs pass the LM itself; nothing changes for them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        return final_hidden(self.model, batch)


class StudentLoss(torch.nn.Module):
    """The student with its loss: ``forward(batch, objective, teacher_hidden, teacher_head, ...)``
    is the trainer's steps 3 and 4 (kdbench/engine/trainer.py) on the causal LM it holds, the
    final hidden states (under bf16 autocast where asked) then ``objective.from_hidden`` through
    the LM's own output head, and returns the :class:`~kdbench.objective.ObjectiveOutput`.

    It exists for fully sharded training (FSDP2, kdbench/engine/fsdp.py): there the parameters
    are whole only inside the sharded module's forward and backward (FSDP's hooks gather them
    and free them again), so the head matmul, made chunk by chunk in ``from_hidden``, must run
    in the forward too; outside it the head (tied to the embeddings in SmolLM2 and the tiny
    models) is a shard. The same module unsharded computes exactly what the trainer computes
    for the bare LM, the same operations in the same order (tests/test_fsdp.py)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, objective, teacher_hidden: Tensor | None = None, teacher_head=None, *,
                bf16_autocast: bool = False, chunk_size: int = 0, row_block_bytes: int = 0,
                denominator: float | None = None):
        with autocast_context(batch.input_ids.device, bf16_autocast):
            hidden = final_hidden(self.model, batch)
        return objective.from_hidden(hidden, output_head(self.model), teacher_hidden, teacher_head,
                                     labels=batch.labels, chunk_size=chunk_size, row_block_bytes=row_block_bytes,
                                     denominator=denominator)


def unwrap(model) -> torch.nn.Module:
    """The causal LM inside ``model``: through a wrapper's ``.module`` and a StudentBody's or
    StudentLoss's ``.model``."""
    while True:
        if isinstance(model, (StudentBody, StudentLoss)):
            model = model.model
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def set_activation_checkpointing(model, enabled: bool) -> bool:
    """Recompute each decoder block's activations in backward instead of keeping them from the
    forward (transformers' checkpointing, non-reentrant). The same operations run on the same
    inputs, so the gradients are bitwise the same (tests/test_engine.py; the standard micro run
    gave the committed run's 1,035 samples); what changes is memory and time: on that run (AMX,
    side by side; docs/performance.md, "the default run under 3 GB") the peak is 2,888 MB with it
    and 3,164 MB without, training 61 s with it and 48 s without. Returns
    whether the model is now checkpointing (False for a model that cannot: anything but a
    transformers model declaring support)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    # transformers >= 5.25 names it activation_checkpointing_*; earlier 5.x gradient_checkpointing_*
    new = hasattr(model, "activation_checkpointing_enable")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enabled:
            kwargs = {"use_reentrant": False}
            if new:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            if new:
                model.activation_checkpointing_disable()
            else:
                model.gradient_checkpointing_disable()
            if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
                model.disable_input_require_grads()  # the enable call added this hook; disable leaves it
    return enabled


def output_head(model):
    """The causal LM's output head module (``weight [V, d]``, maybe ``bias``)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no output head with a weight; kdbench needs a causal LM")
    return head


def head_params(head, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, d], bias [V] | None)`` of an output head, whatever holds it:

    * a causal LM (its :func:`output_head`), also inside a :class:`StudentBody` or a DDP wrapper;
    * a head: an ``nn.Linear``, a module with a ``weight`` (e.g. a tied embedding), a
      ``TeacherHead`` (kdbench/engine/teacher.py);
    * a teacher source (its ``head``);
    * a bare ``[V, d]`` weight tensor (no bias).

    The tensors themselves (training: the parameters the optimiser updates), or cast to
    ``dtype`` (evaluation makes its float32 head once per call site this way)."""
    if isinstance(head, Tensor):
        if head.dim() != 2:
            raise ValueError(f"a head weight must be [V, d], got shape {tuple(head.shape)}")
        weight, bias = head, None
    else:
        if isinstance(head, torch.nn.Module):
            if hasattr(unwrap(head), "get_output_embeddings"):
                head = output_head(unwrap(head))
        elif not isinstance(getattr(head, "weight", None), Tensor) and hasattr(head, "head"):
            head = head.head  # a teacher source
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"head must be a [V, d] weight tensor or an nn.Linear, got {type(head).__name__}")
        bias = getattr(head, "bias", None)
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return weight, bias


@torch.no_grad()
def head_logits_check(model, batch: Batch, hidden: Tensor, rows: int = 32) -> dict:
    """Compare the model's own logits with ``hidden @ Wᵀ (+ b)`` (float32) on the first ``rows``
    counted positions. Returns ``{"max_abs_err", "max_abs_logit", "rel_err"}``; the caller sets
    the tolerance (float32 models: ~1e-5 relative; bf16 models: ~1e-2, their own rounding)."""
    n = min(rows, batch.n_counted)
    keep = batch.counted[:n]
    own = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                logits_to_keep=keep).logits.reshape(n, -1).float()
    ours = torch.nn.functional.linear(hidden[:n].float(), *head_params(model, torch.float32))
    err = float((own - ours).abs().max()) if n else 0.0
    scale = float(ours.abs().max()) if n else 0.0
    return {"max_abs_err": err, "max_abs_logit": scale, "rel_err": err / max(scale, 1e-12), "rows": n}
