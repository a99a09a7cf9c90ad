"""The start-up check: the loss training computes is the loss you asked for.

Before the first step, on the first batch, the training path (packed batch → final hidden
states at counted positions → logits per chunk → objective, gradients made per chunk) is
compared with the dense reference, the plainest way to compute the same loss (right-padded
``[B, T]`` batch, the model's body with an attention mask, logits materialised for every
counted position, :meth:`Objective.compute`): it shares none of the training path's packing,
position selection or chunking, so agreement means those are right. Three comparisons, all in float32 (autocast off):

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

Before the comparisons, :func:`check_contract` calls the objective's own function on the first
counted rows and checks what it returns against the contract of docs/adding-an-objective.md
(a floating-point tensor ``[N]``, optional terms ``{name: [N]}``, a loss that depends on ``s``,
inputs left as they were). A broken contract -- a plug-in with a wrong signature, a wrong
shape or dtype, one that calls ``sys.exit`` -- is one line naming the objective, where its code
is and the rule it broke (:class:`ObjectiveError`). An op torch refuses under
``--deterministic`` (no deterministic implementation on the device) is not a broken contract:
it is passed on, and the run refuses ``--deterministic`` in one line (kdbench/device.py
``refusing_nondeterministic_ops``). A loss that is not finite is not a broken
contract: training stops at its first step and records the divergence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kdbench.data.batching import Batch
from kdbench.device import nondeterministic_op
from kdbench.errors import UserError
from kdbench.modeling import final_hidden, head_logits_check, output_head
from kdbench.objective import ObjectiveContractError
from kdbench.objective_spec import ObjectiveError
from kdbench.plugins import one_line

CONTRACT_ROWS = 8  # rows the contract is checked on: the function's own cost on a few positions

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


def _broke(objective, what: str) -> ObjectiveError:
    return ObjectiveError(f"objective {objective.name!r} ({objective.origin}) broke its contract: {what} "
                          f"(see docs/adding-an-objective.md)")


def _kind(x) -> str:
    """What a returned value is, in a message: 'a float32 tensor of shape (4,)', 'a dict', 'None'."""
    if x is None:
        return "None"
    text = f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}" \
        if isinstance(x, torch.Tensor) else type(x).__name__
    return ("an " if text[0] in "aeiou" else "a ") + text


def _per_position(objective, x, n: int, what: str) -> None:
    """``x`` is a floating-point tensor [n] (the loss or a term), or a contract error."""
    if not isinstance(x, torch.Tensor):
        raise _broke(objective, f"{what} is {_kind(x)} where a tensor of shape ({n},) was expected")
    if not x.is_floating_point():
        raise _broke(objective, f"{what} is {_kind(x)} where a floating-point tensor was expected")
    if tuple(x.shape) != (n,):
        raise _broke(objective, f"{what} is {_kind(x)} where one value per position, shape ({n},), was expected")


def _returned(objective, out, n: int) -> tuple[torch.Tensor, dict]:
    """The ``(per_position, terms)`` of what the objective's function returned, each checked."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise _broke(objective, f"it returned a tuple of {len(out)} items where a tensor [N] or "
                                    f"(tensor [N], {{term: tensor [N]}}) was expected")
        per_row, terms = out
    else:
        per_row, terms = out, None
    _per_position(objective, per_row, n, "its loss")
    if terms is not None and not isinstance(terms, dict):
        raise _broke(objective, f"its terms are {_kind(terms)} where a dict {{name: tensor [N]}} was expected")
    for key, value in (terms or {}).items():
        if not isinstance(key, str):
            raise _broke(objective, f"a term is named {key!r}, not a string")
        _per_position(objective, value, n, f"its term {key!r}")
    return per_row, dict(terms or {})


def check_contract(objective, s: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    """Call the objective's function (and its declared gradient, if any) on the rows ``s``
    ``[N, V]`` (``t`` the teacher's, ``labels`` ``[N]``) and check the contract of
    docs/adding-an-objective.md: it returns a floating-point tensor ``[N]`` or ``(tensor [N],
    {name: tensor [N]})``, the loss depends on ``s`` (a gradient reaches the student), and
    neither input is modified in place. Any failure -- an exception, ``sys.exit`` -- is a
    one-line :class:`ObjectiveError`; values are not judged (not finite is training's business)."""
    n = s.shape[0]
    s_in, t_in, kwargs = objective._call_args(s.detach(), None if t is None else t.detach(), labels)
    leaf = s_in.detach().clone().requires_grad_(True)  # copies: whatever the function does, stays here
    t_in = None if t_in is None else t_in.clone()
    s_was, t_was = leaf.detach().clone(), None if t_in is None else t_in.clone()
    call = f"fn(s, t{''.join(', ' + k + '=...' for k in kwargs)}) on rows [{n}, {s.shape[-1]}]"
    try:
        with torch.enable_grad(), torch.autocast(device_type=leaf.device.type, enabled=False):
            per_row, _ = _returned(objective, objective.invoke(objective.spec.fn, leaf, t_in, **kwargs), n)
            depends = per_row.requires_grad and \
                torch.autograd.grad(per_row.sum(), leaf, allow_unused=True)[0] is not None
    except (ObjectiveError, KeyboardInterrupt):
        raise
    except ObjectiveContractError as exc:  # sys.exit inside it: its message says so
        raise ObjectiveError(str(exc)) from None
    except Exception as exc:
        if nondeterministic_op(exc):  # not the objective's contract: --deterministic on this device (the run says)
            raise
        raise _broke(objective, f"calling it as {call} raised {one_line(exc)}") from None
    if not depends:
        raise _broke(objective, "its loss does not depend on the student logits s (no gradient reaches them: "
                                "computed under no_grad, detached, or from t alone), so training would not change "
                                "the student")
    changed = [name for name, now, was in (("s", leaf.detach(), s_was), ("t", t_in, t_was))
               if now is not None and not bool(((now == was) | (now.isnan() & was.isnan())).all())]  # NaN is NaN
    if changed:
        raise _broke(objective, f"it modified its input {changed[0]} in place (the rows are shared with the rest of "
                                f"the step)")
    if objective.has_gradient:
        try:
            with torch.no_grad(), torch.autocast(device_type=leaf.device.type, enabled=False):
                out = objective.invoke(objective.spec.gradient, leaf.detach(), t_in, **kwargs)
        except KeyboardInterrupt:
            raise
        except ObjectiveContractError as exc:
            raise ObjectiveError(str(exc)) from None
        except Exception as exc:
            if nondeterministic_op(exc):
                raise
            raise _broke(objective, f"calling its gradient as {call.replace('fn(', 'gradient(')} raised "
                                    f"{one_line(exc)}") from None
        if not isinstance(out, tuple) or len(out) != 3:
            raise _broke(objective, f"its gradient returned {_kind(out)} where (values [N], terms, grad [N, V]) "
                                    f"was expected")
        _per_position(objective, out[0], n, "its gradient's values")
        if not isinstance(out[2], torch.Tensor) or tuple(out[2].shape) != tuple(leaf.shape) \
                or not out[2].is_floating_point():
            raise _broke(objective, f"its gradient's grad is {_kind(out[2])} where a floating-point tensor of "
                                    f"shape {tuple(leaf.shape)} was expected")


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
        k = min(CONTRACT_ROWS, h_dense.shape[0])
        with torch.no_grad():
            check_contract(objective, F.linear(h_dense[:k], w), None if t_rows is None else t_rows[:k],
                           labels_dense[:k])

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

        try:
            with torch.enable_grad():
                ref_loss, ref_gh, ref_gw = dense()
                worst = None
                for chunk in sorted({chunk_size, max(1, -(-batch.n_counted // 2))}):
                    loss, gh, gw = fast(chunk)
                    errs = (abs(float(loss - ref_loss)) / max(abs(float(ref_loss)), 1e-6), _rel(gh, ref_gh),
                            _rel(gw, ref_gw))
                    if worst is None or max(errs) > max(worst[1]):
                        worst = (float(loss), errs)
        except ObjectiveContractError as exc:  # from its code on more rows than the contract was checked on
            raise ObjectiveError(str(exc)) from None
        except Exception as exc:
            # ours: a bug, with its traceback; an op --deterministic refuses: the run words that
            if objective.spec.builtin or nondeterministic_op(exc):
                raise
            raise ObjectiveError(f"objective {objective.name!r} ({objective.origin}) failed in the start-up check "
                                 f"(its loss on the first batch): {one_line(exc)}") from None
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


def check_contract_early(objective, n: int = 8, vocab: int = 32) -> None:
    """:func:`check_contract` on synthetic rows (``n`` × ``vocab`` logits from a private generator,
    so no global random state moves), before any model is loaded or any row is written: a
    plug-in that breaks its contract is refused with one line and the store stays as it was.
    The start-up check repeats it on the first real batch."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, vocab, generator=g)
    t = torch.randn(n, vocab, generator=g) if objective.needs_teacher else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    check_contract(objective, s, t, labels)
