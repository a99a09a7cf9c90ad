"""Shared loss machinery: chunked reduction over positions, the hidden-state path, numerics.

Everything a distillation objective needs besides its own formula lives here:

* :func:`chunked_sums` — reduce a per-row function over counted positions chunk by chunk
  (each chunk under ``torch.utils.checkpoint`` when a gradient is needed, so no
  positions × vocabulary float32 intermediate is kept for backward beyond one chunk);
* :func:`chunked_head_loss` — an objective's row function on logits made from final hidden
  states through the output heads, per chunk of counted positions (never held whole), with
  the gradients made in the same pass (the training path: kdbench/engine/trainer.py);
* :func:`blockwise_rows` — a chunk's row function on blocks of a few rows (cache-resident);
* the numerics helpers objectives share, :func:`kl_rows` and :func:`scaled_kl_to_mixture`,
  re-exported from :mod:`kdbench.numerics` where they live.

This module is the bottom layer with kdbench/numerics.py: tensors in, tensors out. It imports
nothing else from kdbench (objective.py builds on it, registry.py on that).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from kdbench.numerics import kl_rows, scaled_kl_to_mixture  # noqa: F401  (re-exported)

#: Positions per chunk in the logits path (``obj(student_logits, teacher_logits, mask)``).
CHUNK_SIZE = 4096
#: Positions per chunk in the hidden-state path (:func:`chunked_head_loss`): 256 rows of a
#: 49,152-token vocabulary are 50 MB of float32 logits (TRL's chunked JSD uses 256 too). The
#: CPU's size and the default; kdbench/engine/tuning.py chooses per device.
HIDDEN_CHUNK_SIZE = 256
#: Bytes of one row block inside a chunk (:func:`blockwise_rows`): an objective's row function runs
#: on ~1 MB of logits per call (5 rows of a 49,152-token vocabulary), so its [rows, V]
#: intermediates stay in the CPU's caches instead of streaming 50 MB buffers through memory. The
#: CPU's size and the default; kdbench/engine/tuning.py chooses per device.
ROW_BLOCK_BYTES = 1 << 20
#: Recompute each chunk in backward instead of keeping its float32 intermediates:
#: True / False, or None = only when there is more than one chunk (big batches; small ones
#: run at full speed). The hidden-state path needs none: it makes its gradients per chunk.
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


def blockwise_rows(per_row_grad: Callable[..., "tuple[Tensor, dict[str, Tensor], Tensor | None]"], s: Tensor,
                   t: Tensor | None, y: Tensor | None, block_rows: int = 0, *,
                   block_bytes: int = 0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """``(Σ loss, {term: Σ}, ∂Σloss/∂s [n, V])`` of a chunk, its row function run on blocks of rows.

    ``per_row_grad(s_b, t_b, y_b) -> ([b] values, {term: [b]}, ∂Σvalues/∂s_b [b, V] or None)``.
    Rows are independent (the start-up check refuses an objective whose rows are not), so a
    block's values and gradient are those of the same rows in the whole chunk, and the sums are
    taken over the concatenated per-row values, as over the chunk's. Measured bitwise the same
    as the whole chunk for every registered objective at a 49,152 vocabulary, 1 and 2 threads
    (the micro standard run reproduced its committed samples); at widths not a multiple of the vector
    length, the transcendental functions' vector and scalar tails fall on other elements and
    jsd / srkl gradients differ from the whole chunk's by ~1e-12. Blocks of ``block_rows`` rows (default:
    ``block_bytes`` of float32 logits, at least 2 rows; ``block_bytes`` 0 is :data:`ROW_BLOCK_BYTES`, the
    CPU's size; a GPU passes a chunk's bytes, one block per chunk: kdbench/engine/tuning.py). Measured on 2 cores (AMX), one
    256-row chunk of a 49,152 vocabulary, the row function forward + backward of kl took
    147 ms whole and 49 ms in 4-row blocks, csd (T,S) 203 and 59 ms, (S,S) 93 and 36 ms,
    against 263 ms for the chunk's four head matmuls.
    """
    n, v = s.shape
    rows = max(2, int(block_rows) or (int(block_bytes) or ROW_BLOCK_BYTES) // (v * 4))
    if n <= rows + 1:
        values, terms, g = per_row_grad(s, t, y)
        return values.sum(), {k: x.sum() for k, x in terms.items()}, torch.zeros_like(s) if g is None else g
    # Never a block of one row: with several threads torch reduces a lone row by splitting it
    # between them (another summation order); two or more rows are split by rows, each row summed
    # as in the whole chunk. So a 1-row remainder joins the last block.
    starts = list(range(0, n, rows))
    if n - starts[-1] == 1:
        starts.pop()
    g = torch.empty_like(s)
    values, terms = [], {}
    for i, j in zip(starts, starts[1:] + [n]):
        rs = slice(i, j)
        vb, tb, gb = per_row_grad(s[rs], None if t is None else t[rs], None if y is None else y[rs])
        g[rs] = 0.0 if gb is None else gb
        values.append(vb)
        for k, x in tb.items():
            terms.setdefault(k, []).append(x)
    return torch.cat(values).sum(), {k: torch.cat(x).sum() for k, x in terms.items()}, g


def check_labels(labels: Tensor, vocab: int) -> None:
    if not labels.numel():
        return
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one host synchronisation, not two
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"labels at counted positions must be token ids in [0, {vocab}); got range "
            f"[{lo}, {hi}] (mask out ignored positions, e.g. -100)"
        )


# ---------------------------------------------------------------------------------------------
# The hidden-state path: logits made per chunk of counted positions, never whole
# ---------------------------------------------------------------------------------------------


def _logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Head logits in float32 (float64 stays float64) whatever the hidden / weight dtypes: the
    objective's residuals (CSD's s − t) need more than bf16's 3 significant digits."""
    dtype = torch.promote_types(compute_dtype(h.dtype), compute_dtype(w.dtype))
    with torch.autocast(device_type=h.device.type, enabled=False):
        return F.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ_rows row_fn(h_s W_sᵀ + b_s, h_t W_tᵀ + b_t, y), chunk by chunk, gradients made in forward.

    Per chunk of rows the student logits ``s [n, V]`` are a leaf; ``row_fn``'s backward (or the
    objective's closed form, ``row_grad``) gives ``∂L/∂s``, from which the chunk's ``∂L/∂h_s = (∂L/∂s) W_s`` and its share of
    ``∂L/∂W_s += (∂L/∂s)ᵀ h_s`` (and ``∂L/∂b_s``) are accumulated at once; then the chunk's
    logits are dropped. Backward only scales the stored ``[N, d]`` / ``[V, d]`` gradients by
    the incoming scalar: nothing ``positions × vocabulary`` is kept, and unlike checkpointing
    nothing is computed twice (the approach of Liger-Kernel's fused linear losses).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, row_fn, chunk_size, terms_out, row_grad):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n = h_s.shape[0]
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=compute_dtype(w_s.dtype), device=w_s.device) if need_w else None
        grad_b = None if b_s is None or not need_b else torch.zeros(b_s.shape, dtype=compute_dtype(b_s.dtype), device=b_s.device)
        total = h_s.new_zeros((), dtype=compute_dtype(h_s.dtype))
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            hs = h_s[start:stop]
            with torch.no_grad():
                t = None if h_t is None else _logits(h_t[start:stop], w_t, b_t)
            y = None if labels is None else labels[start:stop]
            with torch.no_grad():
                s = _logits(hs.detach(), w_s.detach(), None if b_s is None else b_s.detach())
            if row_grad is not None:  # the objective's closed form: no autograd graph over [n, V]
                with torch.no_grad():
                    loss_sum, term_sums, g = row_grad(s, t, y)
            else:
                with torch.enable_grad():
                    s.requires_grad_(True)  # a leaf: the chunk's graph starts at its logits
                    loss_sum, term_sums = row_fn(s, t, y)
                    g = torch.autograd.grad(loss_sum, s, allow_unused=True)[0] if loss_sum.requires_grad else None
            if g is None:  # the loss does not depend on the student here (e.g. a constant)
                g = torch.zeros_like(s)
            total = total + loss_sum.detach().to(total.dtype)
            for key, value in term_sums.items():
                value = value.detach()
                terms_out[key] = value if key not in terms_out else terms_out[key] + value
            with torch.no_grad(), torch.autocast(device_type=g.device.type, enabled=False):
                if need_h:
                    grad_h[start:stop] = (g @ w_s.to(g.dtype)).to(grad_h.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), hs.to(g.dtype))
                if grad_b is not None:
                    grad_b += g.sum(0)
            # dropped before the next chunk's logits are made, not when they replace these
            del s, t, g
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.grads
        ctx.grads = None  # one backward only (like retain_graph=False)
        # in place: the stored gradients are ours alone, and a second [V, d] buffer is 113 MB here
        grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_out.to(g.dtype)).to(dtype)
                                  for g, dtype in zip(grads, ctx.dtypes))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def chunked_head_loss(
    row_fn: RowSums,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    chunk_size: int = 0,
    row_grad: Callable[..., "tuple[Tensor, dict[str, Tensor], Tensor]"] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(Σ_rows loss, {term: Σ_rows})`` of ``row_fn`` on head logits of counted rows only.

    Shapes: ``student_hidden [N, d_s]``, ``student_weight [V, d_s]`` (``student_bias [V]``),
    ``teacher_hidden [N, d_t]`` with ``teacher_weight [V, d_t]`` (or ``None``), ``labels [N]``.
    ``row_fn(s [n, V], t [n, V] | None, y [n] | None) -> (Σ loss, {term: Σ})`` is an objective's
    row function (:meth:`kdbench.objective.Objective.row_sums`); it must treat rows independently
    (the start-up check, kdbench/engine/check.py, refuses one that does not). Logits are float32
    and exist one chunk of ``chunk_size`` rows at a time (default :data:`HIDDEN_CHUNK_SIZE`).
    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``; the teacher side
    is constant. Without a gradient to compute, the chunks run under ``no_grad``.
    ``row_grad(s, t, y) -> (Σ loss, {term: Σ}, ∂Σloss/∂s [n, V])``, optional, replaces autograd
    on ``row_fn`` when a gradient is needed (an objective's closed form).
    """
    chunk_size = int(chunk_size) or HIDDEN_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    terms: dict[str, Tensor] = {}
    if needs_grad:
        total = _ChunkedHeadLoss.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                       teacher_bias, labels, row_fn, chunk_size, terms, row_grad)
        return total, terms
    total = student_hidden.new_zeros((), dtype=compute_dtype(student_hidden.dtype))
    with torch.no_grad():
        for start in range(0, student_hidden.shape[0], chunk_size):
            stop = start + chunk_size
            s = _logits(student_hidden[start:stop], student_weight, student_bias)
            t = None if teacher_hidden is None else _logits(teacher_hidden[start:stop], teacher_weight, teacher_bias)
            y = None if labels is None else labels[start:stop]
            loss_sum, term_sums = row_fn(s, t, y)
            total = total + loss_sum.to(total.dtype)
            for key, value in term_sums.items():
                terms[key] = value if key not in terms else terms[key] + value
    return total, terms
