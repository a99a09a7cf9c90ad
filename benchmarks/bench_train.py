"""Benchmark 1: training tokens/s on the micro suite, side by side in one process.

Arms (same teacher, student recipe, examples, batch order, batch size 8, bf16 autocast where
native, forward KL unless --objective):
  landed        the baseline loop (benchmarks/landed_loop.py): padded batches, full logits, the
                teacher's forward every step -- the plain loop the engine's ratios are taken against
  engine-live   kdbench/engine/trainer.py with the live teacher, as kdbench runs it (activation
                checkpointing on: kdbench/engine/trainer.py ACTIVATION_CHECKPOINTING)
  engine-cache  the same with the teacher cache (built before timing, for these batches)
  engine-live-keep, engine-cache-keep   the same two keeping the activations (checkpointing
                off: more memory, less time; KDBENCH_ACTIVATION_CHECKPOINTING=0 in a run)
  trl-gkd       TRL's GKDTrainer (lmbda=0, beta=0: supervised forward KL; its defaults
                otherwise, incl. gradient checkpointing), if `trl` is installed

Tokens/s = real (attention-mask) tokens through the student / training seconds, over the
measured steps after --warmup steps. Run alone on the machine:

    .venv/bin/python benchmarks/bench_train.py --steps 12 --warmup 2
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

from common import ROOT, micro_setup, report  # noqa: F401  (sets sys.path)

import torch  # noqa: E402


def window_rate(points: list[tuple[int, int, float]], warmup: int) -> tuple[float, float]:
    """(tokens/s, s/step) over the steps after ``warmup`` from cumulative (step, tokens, seconds)."""
    points = sorted(points)
    base = next(p for p in points if p[0] == warmup) if warmup else (0, 0, 0.0)
    last = points[-1]
    dt = last[2] - base[2]
    return (last[1] - base[1]) / dt, dt / (last[0] - base[0])


def arm_landed(teacher, new_student, tok, enc, objective, spec, device, warmup):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from landed_loop import distill

    from kdbench.data.batching import batches

    points = []
    student = new_student()
    distill(teacher=teacher, student=student, objective=objective,
            batches=batches([e for _, e in enc], spec.batch_size, 0, tok.pad_token_id), spec=spec, device=device,
            log=lambda step, p: points.append((step, p["tokens"], p["elapsed_s"])), progress=False)
    return window_rate(points, warmup)


def arm_engine(teacher_source, new_student, tok, enc, objective, spec, device, warmup, checkpointing):
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.trainer import LogHooks, train

    points = []
    student = new_student()
    train(model=student, objective=objective, batches=PackedBatches(enc, spec.batch_size, 0, tok.pad_token_id),
          teacher=teacher_source, spec=spec, device=device,
          hooks=LogHooks(lambda step, p: points.append((step, p["tokens"], p["elapsed_s"]))), progress=False,
          activation_checkpointing=checkpointing)
    return window_rate(points, warmup)


def arm_trl(teacher, new_student, tok, enc, spec, device, warmup, bf16):
    """TRL GKDTrainer with lmbda=0 (no on-policy samples), beta=0 (forward KL), its defaults;
    bf16 where the machine has it natively (the rule kdbench's own arms follow)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdbench.engine.batches import epoch_order

    order = epoch_order(len(enc), 0, 0)[: spec.steps * spec.batch_size]
    rows = []
    for i in order:  # the same examples in the same order as the other arms
        e = enc[i][1]
        # trl 1.16's DataCollatorForChatML takes tokenised rows when they carry a "prompt" (any
        # text: with a completion_mask it is not re-tokenised) and a completion_mask (the prompt
        # boundary); it pads left and masks prompt labels itself.
        rows.append({"prompt": tok.decode(e.ids[:e.n_prompt]), "input_ids": e.ids, "attention_mask": [1] * len(e.ids),
                     "completion_mask": [0] * e.n_prompt + [1] * (len(e.ids) - e.n_prompt)})
    ds = Dataset.from_list(rows)
    times: list[tuple[int, int, float]] = []

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.tokens = 0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter() if self.t0 is None else self.t0

        def on_step_end(self, args, state, control, **kw):
            k = state.global_step
            batch = rows[(k - 1) * spec.batch_size: k * spec.batch_size]
            self.tokens += sum(len(r["input_ids"]) for r in batch)
            times.append((k, self.tokens, time.perf_counter() - self.t0))

    out = tempfile.mkdtemp(prefix="kdbench-trl-")
    cfg = GKDConfig(output_dir=out, per_device_train_batch_size=spec.batch_size, max_steps=spec.steps,
                    learning_rate=spec.lr, lmbda=0.0, beta=0.0, temperature=1.0, bf16=bf16, use_cpu=device.type == "cpu",
                    logging_steps=10_000, save_strategy="no", report_to=[], dataloader_drop_last=True,
                    remove_unused_columns=False, seed=0, data_seed=0, max_length=spec.max_tokens)
    trainer = GKDTrainer(model=new_student(), teacher_model=teacher, args=cfg, train_dataset=ds,
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return window_rate(times, warmup)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--objective", default="kl")
    ap.add_argument("--arms", nargs="+", default=["landed", "engine-live", "engine-live-keep", "engine-cache",
                                                   "engine-cache-keep", "trl-gkd"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from kdbench.device import default_threads
    from kdbench.engine import teacher_cache
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.teacher import CachedTeacher, LiveTeacher
    from kdbench.registry import get_objective
    from kdbench.suites import MICRO
    import dataclasses

    default_threads()
    device = torch.device(args.device)
    teacher, new_student, tok, enc, path = micro_setup(device)
    spec = dataclasses.replace(MICRO.train, steps=args.warmup + args.steps, log_every=1, warmup_steps=1)
    objective = get_objective(args.objective)
    results = {"objective": objective.setting, "batch_size": spec.batch_size, "steps": args.steps,
               "warmup": args.warmup}

    # the examples those steps use, for the cache arm (built before timing, in a temporary cache)
    src = PackedBatches(enc, spec.batch_size, 0, tok.pad_token_id)
    used = {i for _ in range(spec.steps) for i in next(src).example_ids}
    subset = [(i, e) for i, e in enc if i in used]
    results["tokens_per_step"] = sum(len(e.ids) for _, e in subset) / spec.steps

    for arm in args.arms:
        gc.collect()
        if arm == "landed":
            rate = arm_landed(teacher, new_student, tok, enc, objective, spec, device, args.warmup)
        elif arm in ("engine-live", "engine-live-keep"):
            rate = arm_engine(LiveTeacher(teacher), new_student, tok, enc, objective, spec, device, args.warmup,
                              checkpointing=not arm.endswith("-keep"))
        elif arm in ("engine-cache", "engine-cache-keep"):
            if "cache_build_s" not in results:  # one entry for both cache arms
                os.environ["KDBENCH_CACHE"] = tempfile.mkdtemp(prefix="kdbench-bench-cache-")
                _, build_s = teacher_cache.get_or_build("bench", {"bench": True}, teacher, subset, device,
                                                        progress=False, log=lambda *_: None)
                results["cache_build_s"] = round(build_s, 2)
            entry = teacher_cache.lookup("bench")
            rate = arm_engine(CachedTeacher(entry, device), new_student, tok, enc, objective, spec, device,
                              args.warmup, checkpointing=not arm.endswith("-keep"))
        elif arm == "trl-gkd":
            try:
                import trl  # noqa: F401
            except ImportError:
                results["trl-gkd"] = "not installed (pip install trl==1.16.0)"
                continue
            from kdbench.device import native_bf16

            bf16 = native_bf16(device)
            results["trl-gkd precision"] = "bf16" if bf16 else "float32 (no native bf16 here, as kdbench's arms)"
            try:  # an arm failure is reported; the other arms' ratios still print
                rate = arm_trl(teacher, new_student, tok, enc, spec, device, args.warmup, bf16)
            except Exception as exc:  # noqa: BLE001 - the other arms' ratios still print
                results["trl-gkd"] = f"failed: {type(exc).__name__}: {exc}"
                print(f"[bench_train] trl-gkd failed: {type(exc).__name__}: {exc}", flush=True)
                continue
        else:
            raise SystemExit(f"unknown arm {arm}")
        results[arm] = {"tokens_per_s": round(rate[0], 1), "s_per_step": round(rate[1], 3)}
        print(f"[bench_train] {arm}: {rate[0]:.1f} tok/s, {rate[1]:.3f} s/step", flush=True)

    def ratio(a, b):
        if isinstance(results.get(a), dict) and isinstance(results.get(b), dict):
            results[f"{a} / {b}"] = round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 2)

    for a in ("engine-live", "engine-live-keep", "engine-cache", "engine-cache-keep"):
        for b in ("landed", "trl-gkd"):
            ratio(a, b)
    report("train tokens/s (micro)", results, "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
