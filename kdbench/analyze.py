"""Gradient geometry of objectives: do two settings push the student logits the same way?

``gradient_similarity(settings, student_logits, teacher_logits, mask)`` takes each setting's
gradient w.r.t. the student logits over all counted positions (flattened) and reports the
cosine between every pair, the norm ratios and the norms. Example: CSD(S,S) at τ = 1 and RKL
have cosine 1 and norm ratio 2 (REFERENCE §1) — on a leaderboard their difference is an
effective learning rate, and this makes it visible.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from kdbench.losses import compute_dtype
from kdbench.registry import Objective, get_objective

def as_objective(setting) -> Objective:
    """A setting string (``'csd(tau=1.5)'``, ``'rkl'``), ``(name, params)`` or an Objective."""
    if isinstance(setting, Objective):
        return setting
    if isinstance(setting, str):
        return get_objective(setting)
    if isinstance(setting, (tuple, list)) and len(setting) == 2 and isinstance(setting[0], str):
        return get_objective(setting[0], **dict(setting[1] or {}))
    raise ValueError(f"cannot read objective setting {setting!r}: use 'name(key=value,...)' or (name, params)")


def objective_gradients(
    settings: Iterable,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    mask: Tensor | None,
    labels: Tensor | None = None,
    *,
    vocab_size: int | None = None,
) -> tuple[list[Objective], list[Tensor]]:
    """Each setting's gradient w.r.t. the student logits at the counted positions, flattened."""
    objs = [as_objective(s) for s in settings]
    base = student_logits.detach().to(compute_dtype(student_logits.dtype))
    teacher = None if teacher_logits is None else teacher_logits.detach()
    flat_mask = None
    if mask is not None:
        flat_mask = mask.reshape(-1)
        flat_mask = flat_mask if flat_mask.dtype == torch.bool else flat_mask != 0
    grads = []
    for obj in objs:
        s = base.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = obj(s, teacher, mask, labels, vocab_size=vocab_size)
            (g,) = torch.autograd.grad(loss, s, allow_unused=True)
        if g is None:
            g = torch.zeros_like(s)
        g = g.reshape(-1, g.shape[-1])
        if flat_mask is not None:
            g = g[flat_mask.to(g.device)]
        grads.append(g.reshape(-1).double())
    return objs, grads


def gradient_similarity(
    settings: Sequence,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    mask: Tensor | None,
    labels: Tensor | None = None,
    *,
    vocab_size: int | None = None,
) -> dict:
    """Pairwise gradient geometry of objective settings on one batch of logits.

    Returns ``names`` (canonical setting strings), ``cosine`` (matrix, ``None`` where a
    gradient is zero), ``norm_ratio`` (``‖g_i‖ / ‖g_j‖``, ``None`` where ``g_j`` is zero),
    ``grad_norms`` and ``positions`` (the number of counted positions). Gradients are those of
    each objective's mean loss w.r.t. the student logits (float32, float64 accumulation).
    """
    objs, grads = objective_gradients(
        settings, student_logits, teacher_logits, mask, labels, vocab_size=vocab_size
    )
    norms = [float(g.norm()) for g in grads]
    k = len(grads)
    cosine: list[list[float | None]] = [[None] * k for _ in range(k)]
    ratio: list[list[float | None]] = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            if norms[i] > 0 and norms[j] > 0:
                c = float(torch.dot(grads[i], grads[j])) / (norms[i] * norms[j])
                cosine[i][j] = max(-1.0, min(1.0, c))
            if norms[j] > 0:
                ratio[i][j] = norms[i] / norms[j]
    positions = grads[0].numel() // max(1, student_logits.shape[-1]) if grads else 0
    return {
        "names": [o.setting for o in objs],
        "cosine": cosine,
        "norm_ratio": ratio,
        "grad_norms": norms,
        "positions": positions,
    }


def _num(x: float | None, width: int = 8, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    return f"{x:.{digits}f}".rjust(width) if abs(x) < 1e4 else f"{x:.2e}".rjust(width)


def format_similarity_table(result: Mapping) -> str:
    """Text tables of ``gradient_similarity``'s result (rows/columns numbered by setting)."""
    names = list(result["names"])
    k = len(names)
    label_w = max([len(f"[{i + 1}] {n}") for i, n in enumerate(names)] + [10])
    head = " " * label_w + "".join(f"[{j + 1}]".rjust(10) for j in range(k))

    def matrix(title, m):
        lines = [title, head]
        for i, n in enumerate(names):
            lines.append(f"[{i + 1}] {n}".ljust(label_w) + "".join(_num(m[i][j], 10) for j in range(k)))
        return lines

    out = [f"gradients w.r.t. the student logits over {result.get('positions', '?')} counted positions", ""]
    out += matrix("cosine(g_row, g_col)", result["cosine"]) + [""]
    out += matrix("norm ratio |g_row| / |g_col|", result["norm_ratio"]) + [""]
    out.append("gradient norms")
    for i, n in enumerate(names):
        out.append(f"[{i + 1}] {n}".ljust(label_w) + _num(result["grad_norms"][i], 12, 6))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- `kdbench analyze`

DEFAULT_SETTINGS = ("kl", "rkl", "csd_ss", "csd_us", "csd_ts", "csd(w1=T,w2=T)", "dld", "jsd", "tvd", "ce")


def run_analysis(args) -> int:
    """Gradients of each objective w.r.t. the undistilled student's logits on the suite's first
    training batches (same data order as a run with this seed); store and print the matrices."""
    from kdbench import provenance
    from kdbench.config import RunConfig, resolve_suite
    from kdbench.device import numerics, pin_run_settings, resolve_device, restoring_settings
    from kdbench.engine.batches import PackedBatches
    from kdbench.errors import UserError
    from kdbench.modeling import final_hidden, head_params
    from kdbench.prepare import prepare
    from kdbench.store import ROLE_ANALYSIS, RunWriter, open_engine

    settings = list(args.objectives or DEFAULT_SETTINGS)
    try:
        for s in settings:
            as_objective(s)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.batches < 1:
        raise UserError("--batches must be at least 1")
    suite, label = resolve_suite(RunConfig(objective="kl", suite=args.suite, finetune_steps=args.finetune_steps))
    device = resolve_device(getattr(args, "device", "auto"))  # before the store is opened (and perhaps created)
    engine = open_engine(args.db)

    with restoring_settings():
        pin_run_settings(device)
        prep = prepare(suite, device)
        student, teacher = prep.new_student(), prep.teacher()
        it = PackedBatches(prep.train_examples(), suite.train.batch_size, args.seed, prep.tokenizer.pad_token_id)
        ws, wt = head_params(student)[0], head_params(teacher)[0]
        rows_s, rows_t, rows_l = [], [], []
        with torch.no_grad():  # logits at counted positions only; each objective's gradient is taken w.r.t. these
            for _ in range(args.batches):
                b = next(it).to(device)
                rows_s.append(torch.nn.functional.linear(final_hidden(student, b).float(), ws.float()))
                rows_t.append(torch.nn.functional.linear(final_hidden(teacher, b).float(), wt.float()))
                rows_l.append(b.labels)
        s, t, lab = torch.cat(rows_s)[None], torch.cat(rows_t)[None], torch.cat(rows_l)[None]
        result = gradient_similarity(settings, s, t, torch.ones(s.shape[:2], dtype=torch.bool, device=s.device), lab)
        kind = numerics(device, suite.train.bf16_autocast)

    writer = RunWriter.start(engine, role=ROLE_ANALYSIS, suite=suite.name, suite_version=label, seed=args.seed,
                             config={"settings": settings, "batches": args.batches, "suite": suite.to_dict(),
                                     "model": "student-init", "device": str(device), **kind},
                             provenance=provenance.collect(), setting="analysis")
    writer.artifact("grad_similarity", result)
    writer.finish()
    print(format_similarity_table(result))
    print(f"\n[kdbench] analysis stored as run {writer.run_id} ({result['positions']} positions)")
    return 0
