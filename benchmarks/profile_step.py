"""Where a training step's time goes: the trainer's step (kdbench/engine/trainer.py) replayed
phase by phase with the teacher cache, timed with perf_counter, with and without activation
checkpointing; ``--profile`` adds torch.profiler's heaviest operators (grouped by input shape)
for one more step. The micro v1 pair of benchmarks/bench_train.py, forward KL unless
--objective. Run alone on the machine:

    .venv/bin/python benchmarks/profile_step.py --steps 10 --profile

It shows page faults as time: zero-filling a freshly faulted gradient (the tied embedding's,
113 MB) appears as ``aten::fill_``, which is how kdbench/allocator.py's purge delay was chosen
(docs/performance.md, "mimalloc's purge delay").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time

# common sets sys.path and preloads the allocator
from common import add_device_option, bench_device, cached_teacher, machine, micro_setup, synchronize  # noqa: F401

import torch  # noqa: E402

PHASES = ("teacher targets", "student forward", "loss forward", "backward", "clip", "optimiser")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="steps per arm; the first 2 are not counted")
    ap.add_argument("--objective", default="kl")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one more step (activations kept)")
    add_device_option(ap)
    args = ap.parse_args()

    from kdbench.device import autocast_context, default_threads
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.trainer import make_optimizer
    from kdbench.modeling import final_hidden, output_head, set_activation_checkpointing
    from kdbench.registry import get_objective
    from kdbench.suites import MICRO

    default_threads()
    device = bench_device(args.device)
    teacher, new_student, tok, enc, _ = micro_setup(device)
    spec = dataclasses.replace(MICRO.train, steps=args.steps, warmup_steps=1)
    objective = get_objective(args.objective)
    source = cached_teacher(teacher, enc, spec.batch_size, args.steps + 1, tok.pad_token_id, device)
    del teacher
    print(machine())

    for checkpointing in (True, False):
        gc.collect()
        model = new_student()
        set_activation_checkpointing(model, checkpointing)
        params = [p for p in model.parameters() if p.requires_grad]
        head, opt = output_head(model), make_optimizer(model, spec, device)
        batches = PackedBatches(enc, spec.batch_size, 0, tok.pad_token_id)

        def step(batch):
            def mark():  # each phase's kernels finished (CUDA queues them) before the clock is read
                synchronize(device)
                marks.append(time.perf_counter())

            marks: list[float] = []
            mark()
            t_hidden = source.hidden(batch)
            mark()
            with autocast_context(device, spec.bf16_autocast):
                hidden = final_hidden(model, batch)
            mark()
            out = objective.from_hidden(hidden, head, t_hidden, source.head, labels=batch.labels)
            mark()
            out.loss.backward()
            mark()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            mark()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mark()
            return [b - a for a, b in zip(marks, marks[1:])]

        spent, tokens, counted = [0.0] * len(PHASES), 0, 0
        for k in range(args.steps):
            batch = next(batches).to(device)
            times = step(batch)
            if k >= 2:
                spent = [s + t for s, t in zip(spent, times)]
                tokens, counted = tokens + batch.n_tokens, counted + batch.n_counted
        n, total = args.steps - 2, sum(spent)
        print(f"activation checkpointing {checkpointing}: {total / n:.3f} s/step, {tokens / total:.1f} tok/s "
              f"({tokens / n:.0f} tokens, {counted / n:.0f} counted positions a step)")
        for name, s in zip(PHASES, spent):
            print(f"  {name:16s} {s / n:.3f} s  {100 * s / total:5.1f} %")
        if args.profile and not checkpointing:
            with torch.profiler.profile(record_shapes=True) as prof:
                step(next(batches).to(device))
            ops = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:25]
            for e in ops:
                print(f"  {e.key:40.40s} {e.self_cpu_time_total / 1000:8.1f} ms  x{e.count:<4d} {str(e.input_shapes)[:90]}")
    print("command: .venv/bin/python benchmarks/profile_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
