"""Would torch.compile make a training step fast enough for target 1 (docs/performance.md
"Targets": with the teacher cache, >= 3x the baseline loop's tokens/s)?

The trainer's step (teacher cache warm, activations kept, the suite's bf16 autocast where the
CPU has it) on the same batches, eager against the student's transformer body compiled with
``torch.compile(dynamic=True)`` (inductor; packed batches change length every step, so one
dynamic graph rather than one per length). Prints the compile cost (the first compiled steps),
the steady step times side by side, and how far the compiled losses are from the eager ones
(compiled kernels fuse and reorder float operations: results are not bitwise the eager ones).
The micro v1 pair of benchmarks/bench_train.py, forward KL. Run alone on the machine:

    .venv/bin/python benchmarks/probe_compile.py --steps 12
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="steps per arm; the first 3 are not counted")
    add_device_option(ap)
    args = ap.parse_args()

    from kdbench.device import autocast_context, default_threads
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.trainer import make_optimizer
    from kdbench.modeling import final_hidden, output_head
    from kdbench.registry import get_objective
    from kdbench.suites import MICRO

    default_threads()
    device = bench_device(args.device)
    teacher, new_student, tok, enc, _ = micro_setup(device)
    spec = dataclasses.replace(MICRO.train, steps=args.steps, warmup_steps=1)
    objective = get_objective("kl")
    source = cached_teacher(teacher, enc, spec.batch_size, args.steps, tok.pad_token_id, device)
    del teacher
    print(machine())

    results = {}
    for arm in ("eager", "compiled"):
        gc.collect()
        torch.manual_seed(0)
        model = new_student()
        if arm == "compiled":
            model.model = torch.compile(model.model, dynamic=True)
        params = [p for p in model.parameters() if p.requires_grad]
        head, opt = output_head(model), make_optimizer(model, spec, device)
        batches = PackedBatches(enc, spec.batch_size, 0, tok.pad_token_id)
        times, losses, tokens = [], [], []
        for _ in range(args.steps):
            batch = next(batches).to(device)
            synchronize(device)
            t0 = time.perf_counter()
            with autocast_context(device, spec.bf16_autocast):
                hidden = final_hidden(model, batch)
            out = objective.from_hidden(hidden, head, source.hidden(batch), source.head, labels=batch.labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            losses.append(out.loss.item())
            tokens.append(batch.n_tokens)
        steady = sum(times[3:]) / len(times[3:])
        results[arm] = {"first_3_steps_s": round(sum(times[:3]), 1), "steady_s_per_step": round(steady, 3),
                        "tok_per_s": round(sum(tokens[3:]) / sum(times[3:]), 1), "losses": losses}
        print(f"{arm:9s} first 3 steps {sum(times[:3]):7.1f} s   steady {steady:.3f} s/step   "
              f"{results[arm]['tok_per_s']:.1f} tok/s")
    e, c = results["eager"], results["compiled"]
    drift = max(abs(a - b) for a, b in zip(e["losses"], c["losses"]))
    print(f"compiled / eager steady step time: {c['steady_s_per_step'] / e['steady_s_per_step']:.3f}; "
          f"largest loss difference over {args.steps} steps: {drift:.2e} (first step: "
          f"{abs(e['losses'][0] - c['losses'][0]):.2e})")
    print("command: .venv/bin/python benchmarks/probe_compile.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
