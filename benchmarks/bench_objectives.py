"""Benchmark 3: objective cost from hidden states, forward + backward.

* time of every registered objective through the training path (Objective.from_hidden:
  logits per chunk through the heads, gradients made per chunk) at P positions × V vocabulary,
  relative to ``kl``; objectives with a declared closed-form gradient (CSD) are timed a second
  time through autograd (``[autograd]``, the path of an objective without one), side by side;
* peak memory of the chunked path against the materialised one (logits [P, V] made whole,
  Objective.compute) at 8,192 positions — each arm in a fresh subprocess, peak resident
  memory above the process's baseline;
* time and memory as functions of the vocabulary (8k → 256k) and of the positions, with the
  fitted slopes of log(cost) against log(size) (1.0 = linear).

Hidden size 576 (SmolLM2-135M), float32, random hidden states and heads (models built from
config, no hub). Run alone:

    .venv/bin/python benchmarks/bench_objectives.py                       # the full set (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_objectives.py --quick --repeats 1 --memory-positions 8192
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from common import ROOT, report  # noqa: F401  (sets sys.path)

import torch  # noqa: E402

D = 576


def _inputs(p: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(p, D, generator=g) * 0.5).requires_grad_(True)
    w = (torch.randn(v, D, generator=g) * 0.05).requires_grad_(True)
    th, tw = torch.randn(p, D, generator=g) * 0.5, torch.randn(v, D, generator=g) * 0.05
    y = torch.randint(0, v, (p,), generator=g)
    return h, w, th, tw, y


def time_objective(setting: str, p: int, v: int, repeats: int, materialised: bool = False,
                   autograd: bool = False) -> float:
    """Best of ``repeats`` forward + backward. ``autograd``: ignore the objective's declared
    closed-form gradient (the path of every objective that declares none)."""
    import dataclasses

    from kdbench.objective import Objective
    from kdbench.registry import get_objective

    obj = get_objective(setting)
    if autograd:
        obj = Objective(dataclasses.replace(obj.spec, gradient=None), obj.params)
    h, w, th, tw, y = _inputs(p, v)
    best = math.inf
    for _ in range(repeats):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        if materialised:
            loss = obj.compute(torch.nn.functional.linear(h, w), torch.nn.functional.linear(th, tw), None, y).loss
        else:
            loss = obj.from_hidden(h, w, th, tw, labels=y).loss
        loss.backward()
        best = min(best, time.perf_counter() - t0)
    return best


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _child(args) -> None:
    """One measured arm in this (fresh) process: prints {seconds, peak_mb above baseline}.

    The parent starts it with glibc's mmap threshold at 64 KiB, so every large tensor is its
    own mapping and freeing it returns the memory: resident memory then follows live tensors.
    After the inputs exist, the kernel's high-water mark is reset (/proc/self/clear_refs), so
    the peak is the arm's own: VmHWM after the arm minus VmRSS before it."""
    torch.set_num_threads(args.threads)
    h, w, th, tw, y = _inputs(args.positions, args.vocab)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    seconds = time_objective(args.objective, args.positions, args.vocab, 1, materialised=args.materialised)
    print(json.dumps({"seconds": seconds, "peak_mb": _status_mb("VmHWM") - base}))


def measure(objective: str, p: int, v: int, materialised: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--objective", objective, "--positions", str(p), "--vocab", str(v),
           "--threads", str(threads)] + (["--materialised"] if materialised else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer objectives and sizes")
    ap.add_argument("--memory-positions", type=int, default=None,
                    help="positions of the chunked-vs-materialised memory arm (default 8192; 2048 with --quick)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--objective", default="kl", help=argparse.SUPPRESS)
    ap.add_argument("--materialised", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    from kdbench.device import default_threads
    from kdbench.registry import get_objective, list_objectives

    default_threads()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    settings = ["kl", "csd", "csd_us", "csd_ts", "csd(w1=T,w2=T)", "csd(w1=mix,w2=S,tau=1.5)"]
    if not args.quick:
        settings += [s.name for s in list_objectives(include_plugins=False) if s.name not in ("kl", "csd")]
    results: dict = {"positions": args.positions, "vocab": args.vocab, "hidden": D, "threads": threads}
    times = {}
    for s in settings:  # same process, same inputs, alternating nothing else: best of --repeats
        times[s] = time_objective(s, args.positions, args.vocab, args.repeats)
        print(f"[bench_objectives] {s}: {times[s]:.2f}s (x{times[s] / times['kl']:.2f} kl)", flush=True)
    for s in [s for s in settings if get_objective(s).has_gradient]:  # the same objective through autograd
        key = f"{s} [autograd]"
        times[key] = time_objective(s, args.positions, args.vocab, args.repeats, autograd=True)
        print(f"[bench_objectives] {key}: {times[key]:.2f}s (x{times[key] / times['kl']:.2f} kl; closed form "
              f"x{times[s] / times[key]:.2f} of it)", flush=True)
    results["seconds"] = {k: round(v, 3) for k, v in times.items()}
    results["relative_to_kl"] = {k: round(v / times["kl"], 3) for k, v in times.items()}
    results["csd_max_relative_to_kl"] = max(v for k, v in results["relative_to_kl"].items()
                                            if k.startswith("csd") and "[autograd]" not in k)

    mem_p = args.memory_positions or (2048 if args.quick else 8192)
    chunked, dense = measure("csd", mem_p, args.vocab, False, threads), measure("csd", mem_p, args.vocab, True, threads)
    results["memory_at_positions"] = mem_p
    results["peak_mb_chunked"], results["peak_mb_materialised"] = round(chunked["peak_mb"], 1), round(dense["peak_mb"], 1)
    results["chunked / materialised peak"] = round(chunked["peak_mb"] / dense["peak_mb"], 3)
    print(f"[bench_objectives] peak memory at {mem_p} positions: chunked {chunked['peak_mb']:.0f} MB, "
          f"materialised {dense['peak_mb']:.0f} MB", flush=True)

    vocabs = [8192, 32768, 65536, 131072, 262144] if not args.quick else [8192, 65536, 262144]
    vp = 512
    by_v = [measure("csd", vp, v, False, threads) for v in vocabs]
    poss = [512, 1024, 2048, 4096] if not args.quick else [256, 512, 1024]
    by_p = [measure("csd", p, args.vocab, False, threads) for p in poss]
    results["scaling_vocab"] = {"positions": vp, "vocab": vocabs, "seconds": [round(m["seconds"], 3) for m in by_v],
                                "peak_mb": [round(m["peak_mb"], 1) for m in by_v],
                                "time_slope": round(slope(vocabs, [m["seconds"] for m in by_v]), 3),
                                "memory_slope": round(slope(vocabs, [max(m["peak_mb"], 1e-3) for m in by_v]), 3)}
    results["scaling_positions"] = {"vocab": args.vocab, "positions": poss,
                                    "seconds": [round(m["seconds"], 3) for m in by_p],
                                    "peak_mb": [round(m["peak_mb"], 1) for m in by_p],
                                    "time_slope": round(slope(poss, [m["seconds"] for m in by_p]), 3),
                                    "memory_slope": round(slope(poss, [max(m["peak_mb"], 1e-3) for m in by_p]), 3)}
    report("objective cost from hidden states", results, "python benchmarks/bench_objectives.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
