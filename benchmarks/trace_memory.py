"""Where a run's resident memory goes: a per-step trace of one real `kdbench run`, in process.

Prints the resident set (VmRSS) after every training step and around validation and
evaluation, with the peak since the previous line (sampled every 50 ms) and the kernel's
high-water mark (VmHWM). ``--mmap-threshold BYTES`` first sets glibc's M_MMAP_THRESHOLD
(allocations of at least that size get their own mapping and are returned on free), which
separates live tensors from memory the allocator keeps after frees. ``--in-step`` adds marks
inside each step (after the student forward, the chunked loss and the backward; the step's
own line comes after the optimiser step). Each line splits the resident set into anonymous
and file-backed pages (RssAnon / RssFile). Run alone, on a store
with the suite's reference rows (a copy of the committed runs.db):

    cp runs.db /tmp/mem.db
    .venv/bin/python benchmarks/trace_memory.py --db /tmp/mem.db
    .venv/bin/python benchmarks/trace_memory.py --db /tmp/mem.db --mmap-threshold 1048576
    .venv/bin/python benchmarks/trace_memory.py --db /tmp/mem.db --in-step
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time

from common import ROOT  # noqa: F401  (sets sys.path)


def status_mb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--objective", default="csd")
    ap.add_argument("--mmap-threshold", type=int, default=0)
    ap.add_argument("--in-step", action="store_true", help="also mark after the forward, the loss and the backward")
    args = ap.parse_args()
    if args.mmap_threshold:
        print("mallopt(M_MMAP_THRESHOLD) ->", ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold))

    import torch

    import kdbench.recipe as R
    from kdbench.config import RunConfig

    peak = [0]

    def sample():
        while True:
            peak[0] = max(peak[0], status_mb("VmRSS"))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()

    def mark(name: str) -> None:
        peak[0] = max(peak[0], status_mb("VmRSS"))
        print(f"[memory] {name:22s} rss {status_mb('VmRSS'):5d} MB (anon {status_mb('RssAnon'):5d}, file "
              f"{status_mb('RssFile'):4d})  peak since last {peak[0]:5d} MB  hwm {status_mb('VmHWM'):5d} MB", flush=True)
        peak[0] = 0

    train, validation_score, evaluate_all = R.train, R.validation_score, R.evaluate_all

    def traced_train(**kw):
        hooks = kw["hooks"]
        on_step = hooks.on_step
        if args.in_step:  # marks inside each step: after the forward, the loss, the backward
            objective, from_hidden, clip = kw["objective"], kw["objective"].from_hidden, torch.nn.utils.clip_grad_norm_

            def traced_from_hidden(*a, **k):
                mark("  student forward")
                out = from_hidden(*a, **k)
                mark("  loss (chunked heads)")
                return out

            def traced_clip(*a, **k):
                mark("  backward")
                return clip(*a, **k)
            objective.from_hidden, torch.nn.utils.clip_grad_norm_ = traced_from_hidden, traced_clip

        def step(st, opt):
            mark(f"step {st.step} (optimiser)")
            on_step(st, opt)
        hooks.on_step = step
        return train(**kw)

    def traced_validation(*a, **k):
        mark("before validation")
        out = validation_score(*a, **k)
        mark("validation")
        return out

    def traced_evaluation(*a, **k):
        mark("before evaluation")
        t = time.perf_counter()
        out = evaluate_all(*a, **k)
        mark(f"evaluation {time.perf_counter() - t:.0f}s")
        return out

    R.train, R.validation_score, R.evaluate_all = traced_train, traced_validation, traced_evaluation
    R.run(RunConfig(objective=args.objective, db=args.db, save_student=False, progress=False))
    mark("end")


if __name__ == "__main__":
    main()
