"""The callable objective: a registered :class:`~kdbench.objective_spec.ObjectiveSpec` with its
parameters resolved. Get one with :func:`kdbench.registry.get_objective`.

Two paths compute the same number (the start-up check, kdbench/engine/check.py, verifies it
for every run):

* :meth:`Objective.compute` — the **reference** path, on logits ``[..., V]`` already made;
* :meth:`Objective.from_hidden` — the **training** path, on final hidden states and output
  heads, logits made per chunk of counted positions (:func:`kdbench.losses.chunked_head_loss`);
  its gradient from the objective's declared closed form where it has one (CSD), else from
  autograd on the row function.

Both reduce the objective's row function (:meth:`Objective.row_sums`) over counted positions
and divide by their number. Layering: losses (tensor math) ← objective_spec (declarations) ←
objective (this) ← registry (names, discovery).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor

from kdbench import losses as _losses
from kdbench.modeling import head_params
from kdbench.objective_spec import ObjectiveSpec, format_setting


class ObjectiveOutput(NamedTuple):
    loss: Tensor
    terms: dict[str, Tensor]


class ObjectiveContractError(RuntimeError):
    """An objective's function broke the contract of docs/adding-an-objective.md when called: a
    wrong return, or ``SystemExit`` (any non-``Exception`` but ``KeyboardInterrupt``) raised
    from inside it. An ordinary exception, so a run that is training records it as failed; the
    start-up check (kdbench/engine/check.py) reports it before the run exists."""


class Objective:
    """A configured objective: ``obj(student_logits, teacher_logits, mask, labels=None)``."""

    def __init__(self, spec: ObjectiveSpec, params: Mapping[str, Any]):
        self.spec = spec
        self.name = spec.name
        self.params = dict(params)
        self.setting = format_setting(spec, self.params)

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher

    @property
    def needs_labels(self) -> bool:
        return self.spec.needs_labels

    @property
    def behaviour(self) -> str:
        return self.spec.behaviour

    def __repr__(self) -> str:
        return f"Objective({self.setting!r})"

    @property
    def origin(self) -> str:
        """Where the objective's code is, for messages: 'built in' or 'plugin <file or module>'."""
        return "built in" if self.spec.builtin else f"plugin {self.spec.source}"

    def invoke(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` for one of the objective's own functions (the row function or
        its declared gradient): the boundary between kdbench and the objective's code. A
        ``SystemExit`` (or another non-``Exception``) from there becomes an
        :class:`ObjectiveContractError`: an objective that calls ``sys.exit`` must fail the run,
        not end the process with its exit code and leave the run "running". ``KeyboardInterrupt``
        is the user's and goes on; ordinary exceptions go on unchanged."""
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, Exception):
            raise
        except BaseException as exc:
            what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"raised {type(exc).__name__}"
            raise ObjectiveContractError(
                f"objective {self.name!r} ({self.origin}) broke its contract: it {what} while computing its loss "
                f"(an objective returns its per-position loss or raises an exception; it never ends the process)"
            ) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Objective) and other.spec is self.spec and other.params == self.params

    def __hash__(self) -> int:
        return hash((self.name, self.setting))

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, mask: Tensor | None, labels: Tensor | None = None, **kwargs) -> Tensor:
        return self.compute(student_logits, teacher_logits, mask, labels, **kwargs).loss

    # one chunk of counted rows → (Σ loss, {term: Σ}) ; shared with the hidden-state path
    def row_sums(self, s: Tensor, t: Tensor | None, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        per_row, terms = self.per_position(s, t, labels)
        return per_row.sum(), {k: v.detach().sum() for k, v in terms.items()}

    def _call_args(self, s: Tensor, t: Tensor | None, labels: Tensor | None):
        """Rows in the compute dtype (float32; float64 stays) and the keyword arguments of the objective's
        functions (its parameters, plus ``labels`` where it needs them)."""
        dtype = _losses.compute_dtype(s.dtype)
        kwargs = dict(self.params)
        if self.spec.needs_labels:
            kwargs["labels"] = labels
        return s.to(dtype), None if t is None else t.to(dtype), kwargs

    @property
    def has_gradient(self) -> bool:
        """True when the objective declares a closed-form gradient (``@objective(gradient=...)``)."""
        return self.spec.gradient is not None

    def row_sums_grad(self, s: Tensor, t: Tensor | None, labels: Tensor | None = None, *,
                      block_bytes: int = 0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(Σ loss, {term: Σ}, ∂Σloss/∂s [N, V])`` of a chunk of rows, the training path's row
        function for every objective: :meth:`per_position_grad` on blocks of ``block_bytes`` of
        logits (:func:`kdbench.losses.blockwise_rows`; 0: :data:`kdbench.losses.ROW_BLOCK_BYTES`)."""
        return _losses.blockwise_rows(self.per_position_grad, s, t, labels, block_bytes=block_bytes)

    def per_position_grad(self, s: Tensor, t: Tensor | None, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """``([N] values, {term: [N]}, ∂Σvalues/∂s [N, V])``, no graph kept: from the declared closed
        form where the objective has one (:attr:`has_gradient`), else by autograd on
        :meth:`per_position` (None: the values do not depend on ``s``)."""
        s, t = s.detach(), None if t is None else t.detach()
        if not self.has_gradient:
            with torch.enable_grad():
                leaf = s.requires_grad_(True)  # a detached alias: the caller's tensor is untouched
                per_row, terms = self.per_position(leaf, t, labels)
                grad = torch.autograd.grad(per_row.sum(), leaf)[0] if per_row.requires_grad else None
            return per_row.detach(), {k: v.detach() for k, v in terms.items()}, grad
        s, t, kwargs = self._call_args(s, t, labels)
        with torch.no_grad(), torch.autocast(device_type=s.device.type, enabled=False):
            per_row, terms, grad = self.invoke(self.spec.gradient, s, t, **kwargs)
        if tuple(per_row.shape) != (s.shape[0],) or tuple(grad.shape) != tuple(s.shape):
            raise ObjectiveContractError(
                f"objective {self.name!r}: its gradient must return per-position values ({s.shape[0]},) and a "
                f"gradient {tuple(s.shape)}, got {tuple(per_row.shape)} and {tuple(grad.shape)}")
        return per_row, dict(terms or {}), grad

    def per_position(self, s: Tensor, t: Tensor | None, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on rows ``[N, V]`` (no masking, no chunking): ``([N], {term: [N]})``."""
        s, t, kwargs = self._call_args(s, t, labels)
        with torch.autocast(device_type=s.device.type, enabled=False):  # objective math in float32
            out = self.invoke(self.spec.fn, s, t, **kwargs)
        if isinstance(out, tuple):
            per_row, terms = out
        else:
            per_row, terms = out, {}
        if not isinstance(per_row, Tensor) or tuple(per_row.shape) != (s.shape[0],):
            got = tuple(per_row.shape) if isinstance(per_row, Tensor) else type(per_row).__name__
            raise ObjectiveContractError(f"objective {self.name!r} ({self.origin}) must return a per-position tensor "
                                         f"of shape ({s.shape[0]},), got {got}")
        return per_row, dict(terms or {})

    def compute(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        mask: Tensor | None,
        labels: Tensor | None = None,
        *,
        vocab_size: int | None = None,
        chunk_size: int | None = None,
        checkpoint: bool | None = None,
    ) -> ObjectiveOutput:
        """Mean over counted positions of the per-position loss, plus detached mean terms.

        Logits ``[..., V]`` of any float dtype (computed in float32; float64 stays float64),
        ``mask`` of the leading shape (``None`` = all count), ``labels`` of the leading shape
        (only objectives with ``needs_labels``). ``vocab_size`` slices padded head columns off
        both sides. Nothing counted → exactly 0.0, still attached to the graph.
        """
        s = student_logits
        if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() < 1:
            raise ValueError("student_logits must be a floating-point tensor [..., V]")
        spec = self.spec
        t = teacher_logits if spec.needs_teacher else None
        if spec.needs_teacher:
            if t is None:
                raise ValueError(f"objective {self.name!r} needs teacher_logits")
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError("teacher_logits must be a floating-point tensor [..., V]")
            if t.shape[:-1] != s.shape[:-1]:
                raise ValueError(
                    f"teacher_logits have positions {tuple(t.shape[:-1])}, student_logits {tuple(s.shape[:-1])}"
                )
        s, t = _losses.align_vocab(s, t, vocab_size)
        lead = s.shape[:-1]
        vocab = s.shape[-1]
        idx, n = _losses.counted_rows(mask, lead, s.device)
        s_rows = s.reshape(-1, vocab)
        t_rows = None if t is None else t.reshape(-1, vocab)
        y_rows = None
        if spec.needs_labels:
            if labels is None:
                raise ValueError(f"objective {self.name!r} needs labels (the reference next tokens)")
            if tuple(labels.shape) != tuple(lead):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(lead)}")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError("labels must be integer token ids")
            y_rows = labels.reshape(-1).to(device=s.device, dtype=torch.long)
        if idx is not None:
            s_rows = s_rows.index_select(0, idx)
            t_rows = None if t_rows is None else t_rows.index_select(0, idx)
            y_rows = None if y_rows is None else y_rows.index_select(0, idx)
        if y_rows is not None:
            _losses.check_labels(y_rows, vocab)
        size = _losses.CHUNK_SIZE if chunk_size is None else chunk_size
        loss_sum, term_sums = _losses.chunked_sums(self.row_sums, [s_rows, t_rows, y_rows], size, checkpoint=checkpoint)
        denom = max(n, 1)
        return ObjectiveOutput(loss_sum / denom, {k: (v / denom).detach() for k, v in term_sums.items()})

    def from_hidden(
        self,
        student_hidden: Tensor,
        student_head,
        teacher_hidden: Tensor | None = None,
        teacher_head=None,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        row_block_bytes: int = 0,
        denominator: float | None = None,
    ) -> ObjectiveOutput:
        """The objective from final hidden states through the output heads, chunk by chunk.

        Same value and gradients (w.r.t. the student hidden states and head weight / bias) as
        ``compute(student_hidden @ W_sᵀ, teacher_hidden @ W_tᵀ, mask, labels)``, but no
        positions × vocabulary tensor is ever held whole (:func:`kdbench.losses.chunked_head_loss`).
        Hidden states are ``[B, T, d]`` with ``mask [B, T]`` or ``[N, d]`` with ``mask [N]``
        (``None`` = all count); the trainer passes counted rows ``[N, d]`` and ``mask=None``.
        Heads are what :func:`kdbench.modeling.head_params` takes (a weight ``[V, d]``, an
        ``nn.Linear``, a module with ``.weight``, a causal LM, a teacher source); a head padded
        beyond the tokenizer is cut to ``vocab_size`` rows (different widths without
        ``vocab_size`` are an error). ``chunk_size`` counted rows make one chunk of logits (0 or
        None: :data:`kdbench.losses.HIDDEN_CHUNK_SIZE`), and the row function runs on blocks of
        ``row_block_bytes`` of a chunk's logits (0: :data:`kdbench.losses.ROW_BLOCK_BYTES`); the
        trainer takes both from its device's tuning (kdbench/engine/tuning.py).

        ``denominator`` (None: the number of counted positions here, at least 1) divides the sums
        instead: the trainer divides each micro-batch's sums by a count of its whole step, so a
        step split across micro-batches and ranks is still the mean over all the step's counted
        positions (kdbench/engine/trainer.py). Dividing the sums, rather than rescaling this
        batch's mean, keeps the one rounding of the unsplit step.
        """
        spec = self.spec
        if student_hidden.dim() < 1:
            raise ValueError("student_hidden must be [B, T, d] or [N, d]")
        lead = student_hidden.shape[:-1]
        w_s, b_s = head_params(student_head)
        if w_s.shape[1] != student_hidden.shape[-1]:
            raise ValueError(f"student head expects d={w_s.shape[1]}, hidden states have d={student_hidden.shape[-1]}")
        w_t = b_t = None
        if spec.needs_teacher:
            if teacher_hidden is None or teacher_head is None:
                raise ValueError(f"objective {self.name!r} needs the teacher: pass teacher_hidden and teacher_head")
            if teacher_hidden.shape[:-1] != lead:
                raise ValueError(f"teacher_hidden has positions {tuple(teacher_hidden.shape[:-1])}, student {tuple(lead)}")
            w_t, b_t = head_params(teacher_head)
            if w_t.shape[1] != teacher_hidden.shape[-1]:
                raise ValueError(f"teacher head expects d={w_t.shape[1]}, hidden states have d={teacher_hidden.shape[-1]}")
        else:
            teacher_hidden = None
        # vocabulary alignment on the head rows (a [V, d] slice is a view, no copy)
        vs, vt = w_s.shape[0], None if w_t is None else w_t.shape[0]
        if vocab_size is not None or (vt is not None and vs != vt):
            _losses.align_vocab(w_s.new_empty((0, vs)), None if w_t is None else w_t.new_empty((0, vt)), vocab_size)
            if vocab_size is not None:
                w_s, b_s = w_s[:vocab_size], None if b_s is None else b_s[:vocab_size]
                if w_t is not None:
                    w_t, b_t = w_t[:vocab_size], None if b_t is None else b_t[:vocab_size]
        idx, n = _losses.counted_rows(mask, lead, student_hidden.device)
        sh = student_hidden.reshape(-1, student_hidden.shape[-1])
        th = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        lab = None
        if spec.needs_labels:
            if labels is None:
                raise ValueError(f"objective {self.name!r} needs labels (the reference next tokens)")
            if tuple(labels.shape) != tuple(lead):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(lead)}")
            lab = labels.reshape(-1).to(device=sh.device, dtype=torch.long)
        if idx is not None:
            sh = sh.index_select(0, idx)
            th = None if th is None else th.index_select(0, idx)
            lab = None if lab is None else lab.index_select(0, idx)
        if lab is not None:
            _losses.check_labels(lab, w_s.shape[0])
        row_grad = self.row_sums_grad if not row_block_bytes else partial(self.row_sums_grad,
                                                                          block_bytes=int(row_block_bytes))
        loss_sum, term_sums = _losses.chunked_head_loss(self.row_sums, sh, w_s, b_s, th, w_t, b_t, lab,
                                                        chunk_size=chunk_size or 0, row_grad=row_grad)
        denom = max(n, 1) if denominator is None else denominator
        return ObjectiveOutput(loss_sum / denom, {k: (v / denom).detach() for k, v in term_sums.items()})
