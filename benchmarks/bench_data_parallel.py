"""Benchmark: two processes x one thread against one process x two threads, training on the
micro suite, side by side in one invocation (issue 29, target 4).

Both arms run the real ``train()`` (kdbench/engine/trainer.py) in fresh processes the parent
spawns (it only orchestrates), on the same pair (benchmarks/common.py ``micro_setup``: the
SmolLM2-135M-Instruct teacher, live, and micro v1's 16-block student), examples, order, batch
(the suite's 8 examples a step, whatever the world size), objective (forward KL unless
--objective) and step settings (the device's tuning, as runs):

  1x2   one process, two torch threads: a run as it is today
  2x1   two processes, one thread each, gloo on this machine: DDP(StudentBody(student)), each
        rank training its half of every step (kdbench/engine/batches.py ``micro_batches``)

Tokens/s = real tokens through the student (every step's whole batch) / training seconds, over
the measured steps after --warmup (rank 0's clock in 2x1). Where a 2x1 step goes, per rank, in
s/step (a DDP communication hook notes when each gradient bucket's all-reduce is launched and
when it completes, on the machine's monotonic clock, which both processes read alike):

  wait             from this rank's last bucket launch to the other rank's: the backward is done
                   but the other rank's is not (load imbalance, or a core shared with it)
  all-reduce       from both ranks' last launch to the last bucket reduced: communication the
                   backward did not hide
  loss all-reduce  the trainer's one ``all_reduce`` of the step's loss and terms
  compute          the rest: teacher, forward, backward, clipping, optimiser step
  (in flight)      time any gradient all-reduce ran, both ranks present: mostly under the backward

Run alone on the machine (each arm's two cores must be its own):

    .venv/bin/python benchmarks/bench_data_parallel.py --steps 6 --warmup 2
    .venv/bin/python benchmarks/bench_data_parallel.py --tiny     # the tests' tiny pair, 2 steps: < 30 s (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

from bench_train import window_rate
from common import machine, micro_setup, report

import torch  # noqa: E402

ARMS = {"1x2": (1, 2), "2x1": (2, 1)}  # arm -> (processes, threads each)


def setup(tiny_pair: tuple[str, str] | None, objective_name: str):
    """(student, teacher source, objective, examples, pad id, spec) as every process of every arm
    builds them: the micro pair, or ``tiny_pair``'s (teacher, student) folders."""
    from kdbench.engine.teacher import LiveTeacher
    from kdbench.registry import get_objective
    from kdbench.suites import MICRO

    spec = MICRO.train
    if tiny_pair:
        from kdbench.data.batching import encode
        from kdbench.data.micro import build_splits
        from kdbench.models import load_causal_lm, load_tokenizer

        teacher_path, student_path = tiny_pair
        tok = load_tokenizer(teacher_path)
        train = build_splits(MICRO.data["valid_frac"], MICRO.data["test_frac"])["train"][:64]
        enc = [(e.id, encode(tok, e.prompt, e.references[0], spec.max_prompt_tokens, spec.max_tokens)) for e in train]
        teacher, student = load_causal_lm(teacher_path).eval().requires_grad_(False), load_causal_lm(student_path)
    else:
        teacher, new_student, tok, enc, _ = micro_setup(torch.device("cpu"))
        student = new_student()
    return student, LiveTeacher(teacher), get_objective(objective_name), enc, tok.pad_token_id, spec


class StepClock:
    """The trainer's hooks for a benchmark: curve points (cumulative tokens and seconds), each
    step's end, and the communication seen in it (gradient buckets, the loss all-reduce)."""

    def __init__(self):
        self.points: list[tuple[int, int, float]] = []
        self.ends: list[float] = []
        self.buckets: list[dict[int, tuple[float, float]]] = [{}]  # per step: bucket -> (launched, reduced)
        self.loss_reduce: list[float] = [0.0]                        # per step: seconds in the loss all-reduce

    def hooks(self):
        from kdbench.engine.trainer import TrainHooks

        clock = self

        class Hooks(TrainHooks):
            def on_log(self, step, point):
                clock.points.append((step, point["tokens"], point["elapsed_s"]))

            def on_step(self, state, optimizer):
                clock.ends.append(time.perf_counter())
                clock.buckets.append({})
                clock.loss_reduce.append(0.0)

        return Hooks()

    def comm_hook(self, state, bucket):
        """DDP's default (average the bucket across the ranks), noting launch and completion."""
        import torch.distributed as dist

        launched, index = time.perf_counter(), bucket.index()
        fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()

        def reduced(f):
            self.buckets[-1][index] = (launched, time.perf_counter())
            return f.value()[0]

        return fut.then(reduced)

    def timing_loss_reduce(self):
        """Times the trainer's own ``torch.distributed.all_reduce`` calls (DDP's go through the hook)."""
        import torch.distributed as dist

        real = dist.all_reduce

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            self.loss_reduce[-1] += time.perf_counter() - t0
            return out

        dist.all_reduce = timed


def arm_process(rank: int, world: int, threads: int, args, init_file: str, out: str) -> None:
    """One process of an arm: ``train()`` for warm-up + measured steps, its clock written to ``out``."""
    from kdbench.engine.batches import PackedBatches, micro_batches
    from kdbench.engine.trainer import train

    torch.set_num_threads(threads)
    clock = StepClock()
    student, teacher, objective, enc, pad_id, spec = setup(args.tiny_pair, args.objective)
    spec = dataclasses.replace(spec, steps=args.warmup + args.steps, log_every=1)
    order = PackedBatches(enc, spec.batch_size, 0, pad_id)  # this rank's share of each step, to tell imbalance by
    shares = [micro_batches(next(order), rank, world, 1)[0] for _ in range(spec.steps)]
    model = student
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from kdbench.modeling import StudentBody

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this machine: loopback
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))
        model = DDP(StudentBody(student))
        model.register_comm_hook(None, clock.comm_hook)
        clock.timing_loss_reduce()
    try:
        res = train(model=model, objective=objective, batches=PackedBatches(enc, spec.batch_size, 0, pad_id),
                    teacher=teacher, spec=spec, device=torch.device("cpu"), hooks=clock.hooks(), progress=False)
    finally:
        if world > 1:
            dist.destroy_process_group()
    with open(out, "wb") as f:
        pickle.dump({"points": clock.points, "ends": clock.ends, "buckets": clock.buckets[:-1],
                     "loss_reduce": clock.loss_reduce[:-1], "parallel": res.parallel,
                     "tokens": [b.n_tokens for b in shares], "counted": [b.n_counted for b in shares],
                     "batch_size": spec.batch_size}, f)


def run_arm(name: str, args, tmp: Path) -> list[dict]:
    """The arm's processes, spawned together; each one's clock."""
    world, threads = ARMS[name]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as torchrun gives
    outs = [tmp / f"{name}-rank{r}.pkl" for r in range(world)]
    procs = [ctx.Process(target=arm_process, args=(r, world, threads, args, str(tmp / f"{name}-init"), str(outs[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"bench_data_parallel: arm {name} failed (exit codes {[p.exitcode for p in procs]}); "
                         "its traceback is above")
    return [pickle.load(open(o, "rb")) for o in outs]


def breakdown(ranks: list[dict], warmup: int) -> list[dict]:
    """Per rank, the mean s/step of the measured steps split as the module docstring says."""
    steps = range(warmup, len(ranks[0]["ends"]))
    out = [{"tokens": 0.0, "counted": 0.0, "step": 0.0, "wait": 0.0, "all-reduce": 0.0, "loss all-reduce": 0.0,
            "in flight": 0.0} for _ in ranks]
    for k in steps:
        last = [max(launched for launched, _ in r["buckets"][k].values()) for r in ranks]
        both = max(last)
        reduced = max(done for r in ranks for _, done in r["buckets"][k].values())
        spans = sorted((max(r["buckets"][k][b][0] for r in ranks), max(r["buckets"][k][b][1] for r in ranks))
                       for b in ranks[0]["buckets"][k])
        in_flight, covered = 0.0, float("-inf")  # the spans' union
        for start, end in spans:
            in_flight += max(0.0, end - max(start, covered))
            covered = max(covered, end)
        for r, o, mine in zip(ranks, out, last):
            o["tokens"] += r["tokens"][k]
            o["counted"] += r["counted"][k]
            o["step"] += r["ends"][k] - r["ends"][k - 1]
            o["wait"] += both - mine
            o["all-reduce"] += reduced - both
            o["loss all-reduce"] += r["loss_reduce"][k]
            o["in flight"] += in_flight
    for o in out:
        for key in o:
            o[key] /= len(steps)
        o["compute"] = o["step"] - o["wait"] - o["all-reduce"] - o["loss all-reduce"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 6; --tiny: 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1: DDP sets its "
                                                          "buckets in the first)")
    ap.add_argument("--objective", default="kl")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random pair (tests/tiny_models.py) on the "
                                                        "micro suite's data: < 30 s")
    ap.add_argument("--out", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args()
    args.steps = args.steps if args.steps is not None else 2 if args.tiny else 6
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="kdbench-bench-dp-"))
    args.tiny_pair = None
    if args.tiny:  # built once, here: the arms' processes load it
        from tests.tiny_models import make_tiny_pair

        args.tiny_pair = tuple(str(p) for p in make_tiny_pair(tmp / "models"))

    results = {"objective": args.objective, "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny}
    for name in ARMS:
        t0 = time.perf_counter()
        ranks = run_arm(name, args, tmp)
        tok_s, s_step = window_rate(ranks[0]["points"], args.warmup)
        results["batch_size"] = ranks[0]["batch_size"]
        results[name] = {"tokens_per_s": round(tok_s, 1), "s_per_step": round(s_step, 3),
                         "parallel": ranks[0]["parallel"], "wall_s": round(time.perf_counter() - t0, 1)}
        if len(ranks) > 1:
            results[name]["per_rank_s_per_step"] = [{k: round(v, 4) for k, v in b.items()}
                                                   for b in breakdown(ranks, args.warmup)]
        print(f"[bench_data_parallel] {name}: {tok_s:.1f} tok/s, {s_step:.3f} s/step", flush=True)
    results["2x1 / 1x2 tokens/s"] = round(results["2x1"]["tokens_per_s"] / results["1x2"]["tokens_per_s"], 3)

    lines = ["", f"data parallel, micro{' (--tiny pair)' if args.tiny else ''}, {args.objective}, batch "
                 f"{results['batch_size']}, {args.steps} measured steps after {args.warmup}:",
             "| arm | tokens/s | s/step | tokens/s vs 1x2 |", "|---|---|---|---|"]
    for name in ARMS:
        r = results[name]
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.3f} | "
                     f"{r['tokens_per_s'] / results['1x2']['tokens_per_s']:.2f} |")
    parts = ("compute", "wait", "all-reduce", "loss all-reduce", "in flight")
    lines += ["", "2x1, where a step goes (s/step, share of the step; the rank's tokens and counted positions a step):",
              "| rank | tokens | counted | step | " + " | ".join(parts) + " |", "|---" * (len(parts) + 4) + "|"]
    for r, b in enumerate(results["2x1"]["per_rank_s_per_step"]):
        lines.append(f"| {r} | {b['tokens']:.0f} | {b['counted']:.0f} | {b['step']:.3f} | "
                     + " | ".join(f"{b[p]:.3f} ({b[p] / b['step']:.0%})" for p in parts) + " |")
    print("\n".join(lines + [""]), flush=True)
    command = "python benchmarks/bench_data_parallel.py " + " ".join(sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "data parallel tokens/s (micro)", "machine": machine(),
                                              "results": results, "command": command}, indent=2, default=str))
    report("data parallel tokens/s (micro)", results, command)


if __name__ == "__main__":
    main()
