"""The training loop. Read top to bottom: this is where the loss is computed.

One optimiser step::

    batch = next(batches)                              # 1. the step's packed examples (same order for every objective)
    for part in micro_batches(batch, rank, world, accumulation):  # this process's share (one process: the batch)
        teacher = teacher.hidden(part)                 # 2. teacher targets: final hidden states, cached or live
        hidden  = final_hidden(model, part)            # 3. student hidden states at counted positions only
        loss    = objective.from_hidden(hidden, ...)   # 4. objective from hidden states, logits per chunk
        loss.backward()                                # 5. backward (gradients add up over the parts)
    clip_grad_norm_(params, grad_clip)                 # 6. clip (a non-finite loss or norm stops the run here)
    optimizer.step()                                   # 7. AdamW (fused), learning rate from the step

then the hooks (:class:`TrainHooks`): curve points every ``log_every`` steps, the validation
score that selects the checkpoint every ``valid_every`` steps, and the caller's per-step work
(checkpoints). Everything is fixed by the suite's ``TrainSpec``
(kdbench/suites/spec.py); only the objective differs between runs. The parts are injected:
the batch source (kdbench/engine/batches.py), the teacher source (kdbench/engine/teacher.py;
None for objectives that need no teacher, e.g. ``ce``, which is how teachers are fine-tuned), the
train state (kdbench/engine/state.py; pass a restored one to continue a run), the
precision helpers (kdbench/device.py) and the step's settings for the device
(kdbench/engine/tuning.py: logits chunk and row block, activation checkpointing, packed
attention). A step reads the device's values back once (loss, gradient norm, terms together).

A step is the suite's ``batch_size`` examples whatever the number of processes. ``world``
processes (``torch.distributed``, the model wrapped as ``DDP(StudentBody(lm))``) with
``accumulation`` micro-steps each deal the step's examples to ``world * accumulation``
micro-batches (kdbench/engine/batches.py ``micro_batches``: example k to micro-batch k mod
world·accumulation). Each part's loss sum is divided by the whole step's counted positions
(every rank draws the whole step, so it knows their number without asking the others), over
``world`` because DDP averages the ranks' gradients: the parts' gradients add up to
the gradient of the step's mean over all its counted positions, however it is split; DDP
all-reduces them in the last micro-step's backward only (``no_sync`` before). The loss that is
logged and checked is the step's, summed over the parts and all-reduced across processes, so
every rank logs the same value and stops at the same step if it diverges. One process with
``accumulation`` 1 trains the batch whole, exactly as before the split existed.

A student (or a teacher fine-tune) whose training state does not fit one device is trained
fully sharded instead: ``model=shard_student(lm, device)`` (kdbench/engine/fsdp.py, FSDP2). Its
parameters, gradients and AdamW moments are shards outside the model's forward and backward,
so steps 3 and 4 run together *inside* its forward (``model(part, objective, teacher hidden
states, teacher head, ...)``, :class:`~kdbench.modeling.StudentLoss`: the same operations, with
the head whole there); the teacher is replicated on every rank. The step's split, its
denominator and the logged loss are those above (FSDP averages the ranks' gradients as DDP
does); the gradient norm is the whole model's; validation sees the whole weights, gathered
for it on every rank; the best weights are kept as each rank's shards. Its checkpoints are
sharded too (kdbench/engine/fsdp.py ``save`` / ``load``, on every rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kdbench.device import autocast_context
from kdbench.engine.batches import SHARD_RULE, check_split, micro_batches
from kdbench.engine.fsdp import SHARDING, is_sharded, validation_model
from kdbench.engine.state import TrainState, lr_at
from kdbench.engine.tuning import ACTIVATION_CHECKPOINTING, StepTuning, step_tuning  # noqa: F401  (re-exported)
from kdbench.modeling import (StudentLoss, final_hidden, output_head, packed_attention, set_activation_checkpointing,
                              unwrap)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run is recorded as failed with this message."""


@dataclass
class TrainResult:
    steps: int
    train_tokens: int          # real tokens through the model (prompt + response)
    loss_tokens: int           # positions the objective counted
    train_time_s: float        # validation excluded
    tokens_per_s: float        # train_tokens / train_time_s
    selected_step: int
    selection_rule: str
    valid_scores: dict[int, float] = field(default_factory=dict)
    step_tuning: dict = field(default_factory=dict)   # the settings it trained with (StepTuning.to_dict())
    parallel: dict = field(default_factory=dict)      # how a step was split: processes x accumulation x micro-batch


class TrainHooks:
    """What the trainer calls back, one object: subclass it and override what you need (each
    default does nothing, and a run without validation trains to its last step).

    * ``on_log(step, point)`` every ``spec.log_every`` steps and at the last: the window's mean
      ``loss`` and ``terms``, the ``lr``, ``tokens`` so far and ``elapsed_s`` of training;
    * ``validate(model)`` every ``valid_every`` steps and at the last when ``valid_every`` > 0:
      the score that selects the checkpoint (higher is better; ties keep the earlier step);
      ``on_valid(step, score)`` hears each score as it is made;
    * ``on_step(state, optimizer)`` after each step, with the train state and optimiser a
      checkpoint saves (the run's checkpoints, its ownership checks, a graceful stop).
    """

    valid_every: int = 0

    def on_log(self, step: int, point: dict) -> None:
        pass

    def validate(self, model: torch.nn.Module) -> float:
        raise NotImplementedError("valid_every > 0 needs a validate(model) hook")

    def on_valid(self, step: int, score: float) -> None:
        pass

    def on_step(self, state: TrainState, optimizer: torch.optim.Optimizer) -> None:
        pass


class LogHooks(TrainHooks):
    """Hooks that only hear the curve points: the teacher fine-tune, tests and benchmarks."""

    def __init__(self, log: Callable[[int, dict], None]):
        self._log = log

    def on_log(self, step: int, point: dict) -> None:
        self._log(step, point)


def make_optimizer(model: torch.nn.Module, spec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused where torch has a kernel for the device
    (one kernel for all parameters instead of a per-parameter loop, which costs ~15% of a CPU step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=device.type in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def train(
    *,
    model: torch.nn.Module,                    # trained in place (float32 weights); on several processes
                                               # DDP(StudentBody(lm)) (kdbench/modeling.py), or sharded:
                                               # shard_student(lm, device) (kdbench/engine/fsdp.py)
    objective,                                 # a kdbench.objective.Objective
    batches,                                   # PackedBatches (or anything yielding Batch with a state_dict)
    teacher,                                   # a TeacherSource, or None when the objective needs none
    spec,                                      # TrainSpec: steps, lr, schedule, clipping, bf16, log_every
    device: torch.device,
    hooks: TrainHooks | None = None,           # curve points, validation, per-step checkpoints (none: TrainHooks())
    state: TrainState | None = None,           # a restored state continues a run; its .best says where
                                               # the best-so-far weights live (default: in memory)
    optimizer: torch.optim.Optimizer | None = None,
    tuning: StepTuning | None = None,          # the step's settings (None: step_tuning(device, ...) for this
                                               # model and spec, kdbench/engine/tuning.py)
    chunk_size: int = 0,                       # counted positions per logits chunk (0: the tuning's)
    activation_checkpointing: bool | None = None,  # None: the tuning's
    accumulation: int = 1,                     # micro-steps per optimiser step on each process (the step's
                                               # batch split further; gradients accumulate)
    progress: bool = True,
) -> TrainResult:
    from tqdm.auto import tqdm

    if objective.needs_teacher and teacher is None:
        raise ValueError(f"objective {objective.setting} needs a teacher source")
    hooks = hooks or TrainHooks()
    world, rank = _world()
    check_split(spec.batch_size, world, accumulation)
    shards = world * accumulation
    split = shards > 1  # else the batch is trained whole, as it comes
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP's / FSDP's: no reduction in this backward
    in_forward = isinstance(model, StudentLoss)  # the loss is made in the model's forward (FSDP2: the head is whole there)
    valid_every = hooks.valid_every
    lm = unwrap(model)  # the causal LM itself: head, checkpointing, validation, best weights
    if tuning is None:
        tuning = step_tuning(device, model=lm, spec=spec, teacher=teacher,
                             activation_checkpointing=activation_checkpointing)
    elif activation_checkpointing is not None:
        tuning = dataclasses.replace(tuning, activation_checkpointing=activation_checkpointing)
    if chunk_size:
        tuning = dataclasses.replace(tuning, chunk_size=chunk_size)
    model.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    head = output_head(lm)
    opt = optimizer or make_optimizer(lm, spec, device)
    state = state or TrainState()
    opt.zero_grad(set_to_none=True)
    bar = tqdm(range(state.step, spec.steps), desc=f"train {objective.setting}", disable=not progress,
               dynamic_ncols=True, initial=state.step, total=spec.steps)

    # evaluation and later training calls get the models as they came, however the loop ends
    with contextlib.ExitStack() as restore:
        if set_activation_checkpointing(lm, tuning.activation_checkpointing):
            restore.callback(set_activation_checkpointing, lm, False)
        restore.enter_context(packed_attention(lm, tuning.packed_attention))
        if isinstance(getattr(teacher, "model", None), torch.nn.Module):  # a live teacher runs packed rows too
            restore.enter_context(packed_attention(teacher.model, tuning.packed_attention))
        for step in bar:
            t0 = time.perf_counter()
            batch = next(batches)                                                   # 1. the step's batch
            lr = lr_at(step, spec)
            for group in opt.param_groups:
                group["lr"] = lr
            parts = micro_batches(batch, rank, world, accumulation) if split else [batch]
            # each part's sums over the step's count (times world: DDP averages over the ranks)
            denominator = batch.n_counted / world if split else None
            chunks = dict(chunk_size=tuning.chunk_size, row_block_bytes=tuning.row_block_bytes, denominator=denominator)
            outs = []
            for i, part in enumerate(parts):
                part = part.to(device)
                with no_sync() if i < len(parts) - 1 else contextlib.nullcontext():
                    t_hidden = teacher.hidden(part) if objective.needs_teacher else None    # 2. teacher targets
                    t_head = teacher.head if t_hidden is not None else None
                    if in_forward:  # 3. and 4. inside the (sharded) model's forward, the same operations
                        out = model(part, objective, t_hidden, t_head, bf16_autocast=spec.bf16_autocast, **chunks)
                    else:
                        with autocast_context(device, spec.bf16_autocast):
                            hidden = final_hidden(model, part)                             # 3. student hidden states
                        out = objective.from_hidden(hidden, head, t_hidden, t_head,        # 4. objective from hidden
                                                    labels=part.labels, **chunks)
                    out.loss.backward()                                                     # 5. backward
                outs.append((out.loss.detach(), out.terms))
            step_loss, step_terms = _step_values(outs, world)
            norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)           # 6. clip
            loss, norm, terms = _host_values(step_loss, norm, step_terms)
            if not math.isfinite(loss):  # no step taken: the run stops at the step that diverged
                raise TrainingDiverged(f"loss is {loss} at step {step + 1}")
            if not math.isfinite(norm):
                raise TrainingDiverged(f"gradient norm is {norm} at step {step + 1}")
            opt.step()                                                              # 7. optimiser step
            # Gradients are dropped right after the step, not before the next backward: the next forward's
            # activations (the step's memory peak) then never coexist with a model-sized gradient.
            opt.zero_grad(set_to_none=True)

            state.step = done = step + 1
            state.tokens += batch.n_tokens
            state.counted += batch.n_counted
            state.train_time_s += time.perf_counter() - t0
            w = state.window
            w["loss"] += loss
            for k, v in terms.items():
                w["terms"][k] = w["terms"].get(k, 0.0) + v
            w["n"] += 1
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{state.tokens / max(state.train_time_s, 1e-9):.0f}")
            if done % spec.log_every == 0 or done == spec.steps:
                hooks.on_log(done, {"loss": w["loss"] / w["n"], "terms": {k: v / w["n"] for k, v in w["terms"].items()},
                                    "lr": lr, "tokens": state.tokens, "elapsed_s": state.train_time_s})
                state.window = {"loss": 0.0, "terms": {}, "n": 0}

            if valid_every and (done % valid_every == 0 or done == spec.steps):
                with validation_model(model) as whole:  # a sharded student's weights gathered (every rank)
                    score = hooks.validate(whole)
                model.train()
                state.valid_scores[done] = score
                hooks.on_valid(done, score)
                if score > state.best_score:  # ties keep the earlier step
                    state.best_score, state.best_step = score, done
                    if done != spec.steps:  # the last step's weights are the model itself
                        state.best.keep(lm)
            hooks.on_step(state, opt)
        bar.close()

    if state.best_step is not None and state.best_step != spec.steps:
        state.best.restore(lm)
    rule = f"best validation score every {valid_every} steps (ties: earliest)" if valid_every else "last step"
    return TrainResult(
        steps=spec.steps, train_tokens=state.tokens, loss_tokens=state.counted, train_time_s=state.train_time_s,
        tokens_per_s=state.tokens / state.train_time_s if state.train_time_s > 0 else 0.0,
        selected_step=state.best_step if state.valid_scores else spec.steps, selection_rule=rule,
        valid_scores=dict(state.valid_scores), step_tuning=tuning.to_dict(),
        parallel={"world": world, "accumulation": accumulation, "global_batch": spec.batch_size,
                  # fewest and most examples in a micro-batch (the same when world x accumulation divides the batch)
                  "micro_batch": [spec.batch_size // shards, -(-spec.batch_size // shards)],
                  "shard_rule": SHARD_RULE, **({"sharding": SHARDING} if is_sharded(model) else {})},
    )


def _world() -> tuple[int, int]:
    """(processes training together, this one's rank): torch.distributed's once it is initialised, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _step_values(outs: list[tuple[torch.Tensor, dict]], world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and terms from its parts' ``(loss, terms)``, each part's sums already over
    the step's count over ``world``: summed over this process's parts, then across the processes
    (one all-reduce) and divided by ``world``, so every rank holds the same numbers. A batch
    trained whole on one process is its own value, untouched."""
    if len(outs) == 1 and world == 1:
        return outs[0]
    names = list(outs[0][1])
    values = torch.stack([torch.stack([v.to(torch.float64) for v in (loss, *(terms[k] for k in names))])
                          for loss, terms in outs]).sum(0)
    if world > 1:
        torch.distributed.all_reduce(values)
        values = values / world
    return values[0], dict(zip(names, values[1:]))


def _host_values(loss: torch.Tensor, norm: torch.Tensor, terms: dict) -> tuple[float, float, dict[str, float]]:
    """The step's loss, gradient norm and terms as Python floats, in ONE host synchronisation: on a
    GPU every ``.item()`` waits for the device to drain its queue, and the finiteness checks, the
    logging window and the progress bar all read these values. Each converts exactly (float32 and
    float64 to float64), so the floats are bitwise those ``.item()`` / ``float()`` give one by one.
    A sharded student's gradient norm is a DTensor (replicated: every rank's is the whole norm),
    taken as the plain tensor it holds."""
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    values = torch.stack([torch.as_tensor(x).detach().to(device=loss.device, dtype=torch.float64).reshape(())
                          for x in (loss, norm, *terms.values())]).tolist()
    return values[0], values[1], dict(zip(terms, values[2:]))
