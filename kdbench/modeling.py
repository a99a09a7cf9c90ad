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

import warnings

import torch
from torch import Tensor

from kdbench.data.batching import Batch


def final_hidden(model, batch: Batch) -> Tensor:
    """``[N, d]`` final hidden states at ``batch.counted``. Packed sequences stay independent:
    ``position_ids`` restart per sequence and, with no attention mask and no cache,
    transformers masks attention per sequence (flash-attention kernels use them as varlen
    boundaries).

    ``model`` is a causal LM, a :class:`StudentBody`, or a wrapper around one (DDP,
    ``accelerate``'s prepared module): the call then goes through the wrapper's forward."""
    if isinstance(model, StudentBody) or isinstance(getattr(model, "module", None), StudentBody):
        return model(batch)
    if isinstance(getattr(model, "module", None), torch.nn.Module):
        raise TypeError(f"{type(model).__name__} wraps a {type(model.module).__name__}: wrap "
                        "kdbench.modeling.StudentBody(model) instead, so that the forward the wrapper "
                        "hooks (DDP's gradient all-reduce) is the one training calls")
    out = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    h = out.last_hidden_state
    return h.reshape(-1, h.shape[-1]).index_select(0, batch.counted)


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


def unwrap(model) -> torch.nn.Module:
    """The causal LM inside ``model``: through a wrapper's ``.module`` and a StudentBody's ``.model``."""
    while True:
        if isinstance(model, StudentBody):
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
