"""The start-up check: the loss training computes is the loss you asked for.

Before the first step, on the first batch, the training path (packed batch → final hidden
states at counted positions → logits per chunk → objective, gradients made per chunk) is
compared with the dense reference (the landed layout: right-padded ``[B, T]`` batch, the
model's body with an attention mask, logits materialised for every counted position,
:meth:`Objective.compute`). Three comparisons, all in float32 (autocast off):

1. **body**: hidden states at counted positions, packed vs padded (catches packing or
   position-selection errors);
2. **head**: the model's own logits vs ``hidden @ Wᵀ`` (catches a head that is not a plain
   linear map: soft-capping, a logit scale);
3. **objective**: value and gradients w.r.t. the hidden states and the head weight, chunked
   (as configured, and split in two chunks to exercise a chunk boundary) vs dense (catches an
   objective whose rows are not independent, and any bug in the chunked path).

Both paths get the same teacher rows (from the run's teacher source), so the comparison is
exact up to float32 rounding. A mismatch beyond the tolerances refuses the run, naming the
objective, the two values and the error; the result is stored in the run's configuration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kdbench.engine.batches import Batch
from kdbench.engine.forward import final_hidden, head_logits_check, output_head
from kdbench.errors import UserError

# float32 tolerances (relative): measured differences on the micro suite are ~1e-7 .. 1e-6
VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-4
HIDDEN_RTOL = 1e-4
HEAD_RTOL = 1e-4


class FastPathMismatch(UserError):
    """The chunked training path does not compute the dense reference's loss."""


@dataclass
class CheckResult:
    objective: str
    positions: int
    chunk_size: int
    loss_fast: float
    loss_dense: float
    value_rel_err: float
    grad_hidden_rel_err: float
    grad_head_rel_err: float
    hidden_rel_err: float
    head_rel_err: float
    passed: bool
    tolerances: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.numel() else 0.0


def startup_check(model, objective, batch: Batch, teacher, chunk_size: int) -> CheckResult:
    """Run the three comparisons on ``batch`` (see the module docstring); raise
    :class:`FastPathMismatch` when one fails. ``teacher`` is the run's teacher source (or None
    for objectives without a teacher)."""
    was_training = model.training
    model.eval()  # no dropout: both paths must see the same function
    try:
        with torch.autocast(device_type=batch.input_ids.device.type, enabled=False), torch.no_grad():
            h_packed = final_hidden(model, batch).float()
            padded = {k: v.to(batch.input_ids.device) for k, v in batch.padded().items()}
            h_all = model.base_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                     use_cache=False).last_hidden_state
            h_dense = h_all[padded["loss_mask"]].float()
            labels_dense = padded["labels"][padded["loss_mask"]]
            head_err = head_logits_check(model, batch, h_packed)["rel_err"]
        if h_dense.shape != h_packed.shape or not torch.equal(labels_dense, batch.labels):
            raise FastPathMismatch(f"start-up check: the packed batch counts {h_packed.shape[0]} positions, the "
                                   f"padded reference {h_dense.shape[0]} (or different labels): packing is broken")
        hidden_err = _rel(h_packed, h_dense)
        head = output_head(model)
        w = head.weight.detach().float()
        t_hidden = teacher.hidden(batch) if objective.needs_teacher else None
        t_head = teacher.head if objective.needs_teacher else None
        t_rows = None
        if t_hidden is not None:
            t_rows = F.linear(t_hidden.float(), t_head.weight.float(), t_head.bias)

        def dense():
            hh, ww = h_dense.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = objective.compute(F.linear(hh, ww), t_rows, None, labels_dense)
            out.loss.backward()
            return out.loss.detach(), hh.grad, ww.grad

        def fast(chunk):
            hh, ww = h_packed.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = objective.from_hidden(hh, ww, t_hidden, t_head, labels=batch.labels, chunk_size=chunk)
            out.loss.backward()
            return out.loss.detach(), hh.grad, ww.grad

        with torch.enable_grad():
            ref_loss, ref_gh, ref_gw = dense()
            worst = None
            for chunk in sorted({chunk_size, max(1, -(-batch.n_counted // 2))}):
                loss, gh, gw = fast(chunk)
                errs = (abs(float(loss - ref_loss)) / max(abs(float(ref_loss)), 1e-6), _rel(gh, ref_gh), _rel(gw, ref_gw))
                if worst is None or max(errs) > max(worst[1]):
                    worst = (float(loss), errs)
    finally:
        model.train(was_training)
    loss_fast, (v_err, gh_err, gw_err) = worst
    tol = {"value_rtol": VALUE_RTOL, "grad_rtol": GRAD_RTOL, "hidden_rtol": HIDDEN_RTOL, "head_rtol": HEAD_RTOL}
    if not (math.isfinite(float(ref_loss)) and math.isfinite(loss_fast)):
        # Not a fast-path question: the objective itself is not finite here. Training stops at
        # its first step and records the divergence (status failed, step and reason).
        return CheckResult(objective.setting, batch.n_counted, chunk_size, loss_fast, float(ref_loss), math.nan,
                           math.nan, math.nan, hidden_err, head_err, False, {**tol, "note": "loss not finite"})
    passed = v_err <= VALUE_RTOL and gh_err <= GRAD_RTOL and gw_err <= GRAD_RTOL and hidden_err <= HIDDEN_RTOL \
        and head_err <= HEAD_RTOL
    result = CheckResult(objective.setting, batch.n_counted, chunk_size, loss_fast, float(ref_loss), v_err, gh_err,
                         gw_err, hidden_err, head_err, passed, tol)
    if not passed:
        what = ("value" if v_err > VALUE_RTOL else "gradient" if max(gh_err, gw_err) > GRAD_RTOL
                else "hidden states (packing)" if hidden_err > HIDDEN_RTOL else "head logits")
        raise FastPathMismatch(
            f"start-up check refused objective {objective.setting}: the chunked hidden-state path gives loss "
            f"{loss_fast:.6g}, the dense reference {float(ref_loss):.6g} ({what} mismatch: value rel. err "
            f"{v_err:.2e}, grad rel. err {max(gh_err, gw_err):.2e}, hidden {hidden_err:.2e}, head {head_err:.2e}; "
            f"tolerance {VALUE_RTOL:g} / {GRAD_RTOL:g}). Its rows may not be independent; see "
            f"docs/adding-an-objective.md")
    return result
