"""Shared loss machinery: chunked reduction over positions, the hidden-state path, numerics.

Everything a distillation objective needs besides its own formula lives here:

* :func:`chunked_sums` — reduce a per-row function over counted positions chunk by chunk
  (each chunk under ``torch.utils.checkpoint`` when a gradient is needed, so no
  positions × vocabulary float32 intermediate is kept for backward beyond one chunk);
* :func:`loss_from_hidden` / :func:`compute_from_hidden` — the same objective computed from
  final hidden states and LM heads, logits made chunk by chunk (never held whole);
* small numerics helpers objectives share (:func:`kl_rows`, :func:`scaled_kl_to_mixture`).

Nothing here imports :mod:`kdbench.registry` at module level (the registry imports us).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from kdbench.registry import Objective, ObjectiveOutput

#: Positions per chunk in the logits path (``obj(student_logits, teacher_logits, mask)``).
CHUNK_SIZE = 4096
#: Positions per chunk in the hidden-state path (:func:`loss_from_hidden`).
HIDDEN_CHUNK_SIZE = 1024
#: Recompute each chunk in backward instead of keeping its float32 intermediates:
#: True / False, or None = only when there is more than one chunk (big batches; small ones
#: run at full speed). The hidden-state path always checkpoints.
CHECKPOINT: bool | None = None

RowSums = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def chunked_sums(
    fn: RowSums,
    tensors: Sequence[Tensor | None],
    chunk_size: int,
    *,
    checkpoint: bool | None = None,
    needs_grad: bool | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ over rows of ``fn`` evaluated chunk by chunk.

    ``fn(*row_chunks) -> (loss_sum, {term: term_sum})`` receives the same row range of every
    tensor in ``tensors`` (``None`` entries are passed through). Rows are split with one
    ``torch.split`` (a single autograd node, so backward concatenates chunk gradients once).
    With a gradient needed and checkpointing on (``checkpoint``, default :data:`CHECKPOINT`:
    only when there is more than one chunk), each chunk runs under non-reentrant
    ``torch.utils.checkpoint``: only the (views of the) inputs are kept, the chunk's float32
    intermediates are recomputed in backward. Term sums come back detached. ``needs_grad``
    overrides the detection from ``tensors`` (for functions closing over parameters).
    """
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    real = [x for x in tensors if x is not None]
    n = real[0].shape[0]
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in real)
    policy = CHECKPOINT if checkpoint is None else checkpoint
    use_ckpt = needs_grad and (n > chunk_size if policy is None else bool(policy))
    if n <= chunk_size:
        pieces = [list(tensors)]
    else:
        split = [None if x is None else torch.split(x, chunk_size) for x in tensors]
        k = -(-n // chunk_size)
        pieces = [[None if sp is None else sp[i] for sp in split] for i in range(k)]
    total: Tensor | None = None
    terms: dict[str, Tensor] = {}
    for piece in pieces:
        if use_ckpt:
            loss_sum, term_sums = _torch_checkpoint(fn, *piece, use_reentrant=False)
        else:
            loss_sum, term_sums = fn(*piece)
        total = loss_sum if total is None else total + loss_sum
        for key, value in term_sums.items():
            value = value.detach()
            terms[key] = value if key not in terms else terms[key] + value
    assert total is not None
    return total, terms


def align_vocab(
    student: Tensor, teacher: Tensor | None, vocab_size: int | None
) -> tuple[Tensor, Tensor | None]:
    """Slice padded vocabulary columns off (REFERENCE §1: a head larger than the tokenizer).

    With ``vocab_size`` both sides are cut to it (error if either is smaller). Without it,
    different student/teacher widths are an error: guessing would silently corrupt the loss.
    """
    vs = student.shape[-1]
    vt = None if teacher is None else teacher.shape[-1]
    if vocab_size is not None:
        vocab_size = int(vocab_size)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if vs < vocab_size or (vt is not None and vt < vocab_size):
            raise ValueError(
                f"vocab_size={vocab_size} is larger than the logits: student has {vs} columns"
                + ("" if vt is None else f", teacher has {vt}")
            )
        if vs > vocab_size:
            student = student[..., :vocab_size]
        if teacher is not None and vt > vocab_size:
            teacher = teacher[..., :vocab_size]
    elif vt is not None and vs != vt:
        raise ValueError(
            f"student vocabulary ({vs}) and teacher vocabulary ({vt}) differ. If one LM head is "
            f"padded beyond the tokenizer, pass vocab_size=<tokenizer size> to slice the padding "
            f"off; genuinely different vocabularies cannot be distilled token by token."
        )
    return student, teacher


def counted_rows(mask: Tensor | None, lead_shape: torch.Size, device) -> tuple[Tensor | None, int]:
    """Indices of counted positions in the flattened lead dims (``None`` = all count)."""
    n_all = int(math.prod(lead_shape))
    if mask is None:
        return None, n_all
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(lead_shape)} (the logits without the vocabulary dim)")
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    flat = flat.to(device)
    if bool(flat.all()):
        return None, n_all
    idx = flat.nonzero().squeeze(1)
    return idx, int(idx.numel())


def check_labels(labels: Tensor, vocab: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(
            f"labels at counted positions must be token ids in [0, {vocab}); got range "
            f"[{int(labels.min())}, {int(labels.max())}] (mask out ignored positions, e.g. -100)"
        )


# ---------------------------------------------------------------------------------------------
# The hidden-state path
# ---------------------------------------------------------------------------------------------


def _head_params(head) -> tuple[Tensor, Tensor | None]:
    if isinstance(head, torch.nn.Linear):
        return head.weight, head.bias
    if isinstance(head, Tensor):
        if head.dim() != 2:
            raise ValueError(f"a head weight must be [V, d], got shape {tuple(head.shape)}")
        return head, None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor):
        return weight, getattr(head, "bias", None)
    raise TypeError(f"head must be a [V, d] weight tensor or an nn.Linear, got {type(head).__name__}")


def compute_from_hidden(
    obj: "Objective | str",
    student_hidden: Tensor,
    student_head,
    teacher_hidden: Tensor | None = None,
    teacher_head=None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> "ObjectiveOutput":
    """``obj`` evaluated from hidden states through the LM heads, chunk by chunk.

    Same value and gradients (w.r.t. the student hidden states and head weight/bias) as
    ``obj(student_hidden @ W_s.T, teacher_hidden @ W_t.T, mask, labels)``, but no
    positions × vocabulary tensor is ever held whole: per chunk of counted positions the
    teacher logits are made under ``no_grad`` and the student logits + objective run under
    ``torch.utils.checkpoint`` (recomputed in backward). Hidden states are ``[B, T, d]`` with
    ``mask [B, T]`` or ``[N, d]`` with ``mask [N]`` (``None`` = all count). Heads are a weight
    ``[V, d]`` or an ``nn.Linear``; a head padded beyond the tokenizer is cut to ``vocab_size``
    rows (different widths without ``vocab_size`` are an error).
    """
    from kdbench.registry import ObjectiveOutput, get_objective

    if isinstance(obj, str):
        obj = get_objective(obj)
    spec = obj.spec
    chunk_size = HIDDEN_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if student_hidden.dim() < 1:
        raise ValueError("student_hidden must be [B, T, d] or [N, d]")
    lead = student_hidden.shape[:-1]
    w_s, b_s = _head_params(student_head)
    if w_s.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student head expects d={w_s.shape[1]}, hidden states have d={student_hidden.shape[-1]}")
    w_t = b_t = None
    if spec.needs_teacher:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(f"objective {obj.name!r} needs the teacher: pass teacher_hidden and teacher_head")
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(
                f"teacher_hidden has positions {tuple(teacher_hidden.shape[:-1])}, student {tuple(lead)}"
            )
        w_t, b_t = _head_params(teacher_head)
        if w_t.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher head expects d={w_t.shape[1]}, hidden states have d={teacher_hidden.shape[-1]}")
    else:
        teacher_hidden = None
    # vocabulary alignment on the head rows (a [V, d] slice is a view, no copy)
    vs, vt = w_s.shape[0], None if w_t is None else w_t.shape[0]
    if vocab_size is not None or (vt is not None and vs != vt):
        probe_s = w_s.new_empty((0, vs))
        probe_t = None if w_t is None else w_t.new_empty((0, vt))
        align_vocab(probe_s, probe_t, vocab_size)  # raises with the standard message
        if vocab_size is not None:
            w_s = w_s[:vocab_size]
            b_s = None if b_s is None else b_s[:vocab_size]
            if w_t is not None:
                w_t = w_t[:vocab_size]
                b_t = None if b_t is None else b_t[:vocab_size]
    vocab = w_s.shape[0]

    idx, n = counted_rows(mask, lead, student_hidden.device)
    d_s = student_hidden.shape[-1]
    sh = student_hidden.reshape(-1, d_s)
    th = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    lab = None
    if spec.needs_labels:
        if labels is None:
            raise ValueError(f"objective {obj.name!r} needs labels (the reference next tokens)")
        if tuple(labels.shape) != tuple(lead):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(lead)}")
        lab = labels.reshape(-1).to(device=sh.device, dtype=torch.long)
    if idx is not None:
        sh = sh.index_select(0, idx)
        th = None if th is None else th.index_select(0, idx)
        lab = None if lab is None else lab.index_select(0, idx)
    if lab is not None:
        check_labels(lab, vocab)

    def chunk_fn(h_s: Tensor, h_t: Tensor | None, y: Tensor | None):
        s = F.linear(h_s, w_s, b_s)
        t = None
        if h_t is not None:
            with torch.no_grad():
                t = F.linear(h_t, w_t, b_t)
        return obj.row_sums(s, t, y)

    # the head weight is captured by the closure: non-reentrant checkpoint gives it gradients
    needs_grad = torch.is_grad_enabled() and (sh.requires_grad or w_s.requires_grad or (b_s is not None and b_s.requires_grad))
    loss_sum, term_sums = chunked_sums(chunk_fn, [sh, th, lab], chunk_size, checkpoint=True, needs_grad=needs_grad)
    denom = max(n, 1)
    loss = loss_sum / denom
    return ObjectiveOutput(loss, {k: (v / denom).detach() for k, v in term_sums.items()})


def loss_from_hidden(
    obj: "Objective | str",
    student_hidden: Tensor,
    student_head,
    teacher_hidden: Tensor | None = None,
    teacher_head=None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """The loss of :func:`compute_from_hidden` (mean over counted positions, 0-dim)."""
    return compute_from_hidden(
        obj, student_hidden, student_head, teacher_hidden, teacher_head, mask, labels,
        chunk_size=chunk_size, vocab_size=vocab_size,
    ).loss


# ---------------------------------------------------------------------------------------------
# Numerics helpers shared by objectives (rows: [N, V] log-probabilities, results: [N])
# ---------------------------------------------------------------------------------------------


def kl_rows(la: Tensor, lb: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a (log a − log b) per row, from log-probabilities."""
    return (la.exp() * (la - lb)).sum(-1)


def _g_series(x: Tensor) -> Tensor:
    """(x − log1p x) / x² = Σ_{k≥2} (−x)^(k−2)·(−1)^k / k, 12 terms (|x| < 0.25: rel. err < 1e-8)."""
    acc = torch.full_like(x, 1.0 / 13.0)
    for k in range(12, 1, -1):
        acc = (1.0 / k) - x * acc
    return acc


class _ScaledKLToMixture(torch.autograd.Function):
    """Σ_v a·(x − log1p x)/γ with an analytic backward (nothing but la, lb is saved)."""

    @staticmethod
    def forward(ctx, la: Tensor, lb: Tensor, gamma: float) -> Tensor:
        ctx.gamma = gamma
        ctx.save_for_backward(la, lb)
        a = la.exp()
        u = lb - la
        log_mix = _log_mix(u, gamma)  # log(1 + x) = log((1−γ) + γ·b/a), finite for any logits
        # a·(x − log1p x)/γ = (b − a) − a·log(1+x)/γ : accurate unless |x| is small
        term = torch.addcmul(lb.exp() - a, a, log_mix, value=-1.0 / gamma)
        # |x| < 0.25  ⇔  log(1 − 0.25/γ) < u < log(1 + 0.25/γ)
        small = u < math.log1p(0.25 / gamma)
        if gamma > 0.25:
            small &= u > math.log1p(-0.25 / gamma)
        idx = small.reshape(-1).nonzero().squeeze(1)
        if idx.numel():
            e = torch.expm1(u.reshape(-1).index_select(0, idx))  # b/a − 1
            xs = gamma * e
            # a·(x − log1p x)/γ = a·(b/a − 1)·x·series(x): no cancellation, error ∝ γ
            small_terms = a.reshape(-1).index_select(0, idx) * e * xs * _g_series(xs)
            term.reshape(-1).index_copy_(0, idx, small_terms)
        return term.sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        la, lb = ctx.saved_tensors
        gamma = ctx.gamma
        log_mix = _log_mix(lb - la, gamma)
        b = lb.exp()
        b_over_1px = (lb - log_mix).exp()  # b/(1 + x)
        g = grad.unsqueeze(-1)
        # summand F = (b − a) − a·log(1+x)/γ with ∂x/∂log a = −γ·b/a, ∂x/∂log b = γ·b/a:
        # ∂F/∂log a = b/(1+x) − a − a·log(1+x)/γ ;  ∂F/∂log b = b − b/(1+x)
        grad_la = (b_over_1px - la.exp() * (1.0 + log_mix / gamma)) * g
        grad_lb = (b - b_over_1px) * g
        return grad_la, grad_lb, None


def _log_mix(u: Tensor, gamma: float) -> Tensor:
    return torch.logaddexp(u + math.log(gamma), torch.full_like(u, math.log1p(-gamma)))


def scaled_kl_to_mixture(la: Tensor, lb: Tensor, gamma: float) -> Tensor:
    """KL(a ‖ γ·b + (1−γ)·a) / γ per row, accurate for every γ ∈ [0, 1].

    Per vocabulary entry, with u = log b − log a and x = γ·(b/a − 1) (so the mixture is
    a·(1 + x)), the summand is a·(x − log1p x)/γ ≥ 0. For |x| < 0.25 it is evaluated as
    a·(b/a − 1)·x·series(x) (no cancellation, error ∝ γ), otherwise as
    (b − a) − a·log((1−γ) + γ·b/a)/γ with the log from ``logaddexp`` (no overflow for any
    logits). γ = 1 gives KL(a‖b); γ → 0 goes continuously to 0 (value 0 at γ = 0).
    The backward is analytic (∂/∂log a = b/(1+x) − a − a·log(1+x)/γ, ∂/∂log b = b − b/(1+x)).
    """
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma == 0.0:
        return la[..., 0] * 0.0  # exactly 0, keeps the graph
    if gamma == 1.0:
        return kl_rows(la, lb)
    return _ScaledKLToMixture.apply(la, lb, gamma)
