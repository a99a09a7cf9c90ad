"""The baseline distillation loop ("landed" in the benchmarks): padded batches, full logits for
every position, the teacher's forward every step. The engine's speed is reported as a ratio to
it, side by side in one process (benchmarks/bench_train.py), so its code is frozen: changing it
would change every ratio in docs/performance.md. Not used by kdbench itself.

The loop, read top to bottom: this is where the loss is computed.

One optimiser step:
  1. take the next batch (same order for every objective: data/batching.py),
  2. teacher forward, frozen, without gradients,
  3. student forward,
  4. objective(student_logits, teacher_logits, loss_mask, labels) — the registry's contract,
  5. backward, clip, AdamW step, learning-rate schedule,
  6. log the loss and the objective's terms; every ``valid_every`` steps score the validation
     set and keep the best student weights (the checkpoint-selection rule).

Everything the loop does is fixed by the suite's ``TrainSpec`` (kdbench/suites/spec.py); only the
objective differs between runs.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from kdbench.suites import TrainSpec


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run is recorded as failed with this message."""


@dataclass
class TrainResult:
    steps: int
    train_tokens: int          # all tokens through the student (prompt + response)
    loss_tokens: int           # tokens the objective counted
    wall_time_s: float
    tokens_per_s: float
    peak_memory_mb: float | None
    selected_step: int
    selection_rule: str
    valid_scores: dict[int, float] = field(default_factory=dict)


def native_bf16(device: torch.device) -> bool:
    """bf16 is fast on CUDA with bf16 support and on CPUs with avx512_bf16 / AMX; elsewhere it
    is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast where bf16 is native; float32 elsewhere."""
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * lr_min_ratio`` at the last step."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    floor = spec.lr * spec.lr_min_ratio
    return floor + 0.5 * (spec.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except Exception:
        return None


def distill(
    *,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    objective,
    batches,                                   # iterator of dicts from data.batching.batches
    spec: TrainSpec,
    device: torch.device,
    log: Callable[[int, dict], None],          # receives curve points: step, {loss, terms, lr, tokens, elapsed_s}
    validate: Callable[[torch.nn.Module], float] | None = None,  # higher is better
    valid_every: int = 0,
    progress: bool = True,
) -> TrainResult:
    from tqdm.auto import tqdm

    teacher.eval().requires_grad_(False)
    student.train()
    needs_teacher = getattr(objective.spec, "needs_teacher", True)
    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)

    best_score, best_step, best_state = -math.inf, spec.steps, None
    valid_scores: dict[int, float] = {}
    train_tokens = loss_tokens = 0
    valid_time = 0.0  # excluded from the training throughput
    window_loss, window_terms, window_n = 0.0, {}, 0
    t0 = time.perf_counter()
    bar = tqdm(range(spec.steps), desc=f"distil {objective.setting}", disable=not progress, dynamic_ncols=True)

    for step in bar:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        lr = lr_at(step, spec)
        for group in opt.param_groups:
            group["lr"] = lr

        with autocast_context(device, spec.bf16_autocast):
            teacher_logits = None
            if needs_teacher:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = objective.compute(student_logits, teacher_logits, batch["loss_mask"], labels=batch["labels"])

        if not torch.isfinite(out.loss):
            raise TrainingDiverged(f"loss is {out.loss.item()} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), spec.grad_clip)
        opt.step()

        train_tokens += int(batch["attention_mask"].sum())
        loss_tokens += int(batch["loss_mask"].sum())
        window_loss += out.loss.item()
        for k, v in out.terms.items():
            window_terms[k] = window_terms.get(k, 0.0) + float(v)
        window_n += 1
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{out.loss.item():.4f}", tok_s=f"{train_tokens / max(elapsed - valid_time, 1e-9):.0f}")

        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            log(done, {"loss": window_loss / window_n, "terms": {k: v / window_n for k, v in window_terms.items()},
                       "lr": lr, "tokens": train_tokens, "elapsed_s": elapsed})
            window_loss, window_terms, window_n = 0.0, {}, 0

        if validate is not None and valid_every and (done % valid_every == 0 or done == spec.steps):
            v0 = time.perf_counter()
            score = validate(student)
            valid_time += time.perf_counter() - v0
            student.train()
            valid_scores[done] = score
            if score > best_score:  # ties keep the earlier step
                best_score, best_step = score, done
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}

    bar.close()
    wall = time.perf_counter() - t0
    train_time = wall - valid_time
    if best_state is not None and best_step != spec.steps:
        student.load_state_dict(best_state)
    rule = (f"best validation score every {valid_every} steps (ties: earliest)" if validate is not None and valid_every
            else "last step")
    return TrainResult(
        steps=spec.steps, train_tokens=train_tokens, loss_tokens=loss_tokens, wall_time_s=wall,
        tokens_per_s=train_tokens / train_time if train_time > 0 else 0.0, peak_memory_mb=peak_memory_mb(device),
        selected_step=best_step if valid_scores else spec.steps, selection_rule=rule, valid_scores=valid_scores,
    )
