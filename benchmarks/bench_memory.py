"""Benchmark 2: peak resident memory of a `kdbench run`, per phase.

Starts the run as a child process, samples its resident set (VmRSS, /proc) every 0.2 s and
splits the samples into phases by the run's own progress lines: set-up (models, data,
reference rows) until "run N:", training until "trained", evaluation until "cost:". Prints
the peak of each phase, the kernel's high-water mark (VmHWM, what `/usr/bin/time -v` reports
as "Maximum resident set size") and the command. ``--arm "NAME=VALUE ..."`` (repeatable) runs
the command once per arm with those variables set, one after the other, and prints each arm's
figures and its ratios to the first arm. Run alone, on a store that already holds the suite's
reference rows (otherwise set-up includes evaluating them):

    .venv/bin/python benchmarks/bench_memory.py -- --objective csd --no-save --db /tmp/mem.db
    .venv/bin/python benchmarks/bench_memory.py --arm "" --arm KDBENCH_ACTIVATION_CHECKPOINTING=0 \
        -- --objective csd --no-save --db /tmp/mem.db
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

from common import report  # noqa: F401  (sets sys.path)

PHASES = ((re.compile(r"\[kdbench\] run \d+: "), "training"), (re.compile(r"\[kdbench\] trained "), "evaluation"),
          (re.compile(r"\[kdbench\] cost:"), "writing"))


def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """One run of ``cmd``: its exit code, wall time, phase starts and peaks, VmHWM."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, **env})
    phase = ["set-up"]
    peaks: dict[str, int] = {}
    hwm = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = status_kb(proc.pid, "VmRSS")
            if rss is not None:
                peaks[phase[0]] = max(peaks.get(phase[0], 0), rss)
                hwm[0] = max(hwm[0], status_kb(proc.pid, "VmHWM") or 0)
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    starts = {"set-up": 0.0}
    cost = ""
    for line in proc.stdout:
        for marker, name in PHASES:
            if marker.match(line):
                phase[0] = name
                starts[name] = round(time.perf_counter() - t0, 1)
        if line.startswith("[kdbench]") and not line.startswith("[kdbench] resolved"):
            print(line.rstrip(), flush=True)
        if line.startswith("[kdbench] cost:"):
            cost = line.split(":", 1)[1].strip()
    rc = proc.wait()
    done.set()
    t.join()
    return {"env": env, "exit_code": rc, "wall_s": round(time.perf_counter() - t0, 1), "phase_start_s": starts,
            "peak_rss_mb_by_phase": {k: round(v / 1024) for k, v in peaks.items()},
            "vm_hwm_mb": round(hwm[0] / 1024), "run_cost": cost}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", action="append", default=None,
                    help='"NAME=VALUE ..." environment of one arm (repeatable; "" = as the environment is)')
    ap.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: the `kdbench run` arguments")
    args = ap.parse_args()
    run_args = [a for a in args.run_args if a != "--"] or ["--objective", "csd", "--no-save"]
    cmd = [sys.executable, "-m", "kdbench", "run", *run_args, "--no-progress"]
    arms = [dict(kv.split("=", 1) for kv in arm.split()) for arm in (args.arm or [""])]
    results = [measure(cmd, env) for env in arms]
    command = "python benchmarks/bench_memory.py " + "".join(f'--arm "{a}" ' for a in (args.arm or [])) + \
        "-- " + " ".join(run_args)
    if len(results) == 1:
        report("peak resident memory of kdbench run", {k: v for k, v in results[0].items() if k != "env"}, command)
        return
    first = results[0]
    for r in results[1:]:
        r["vs_first_arm"] = {"vm_hwm": round(r["vm_hwm_mb"] / first["vm_hwm_mb"], 3),
                             "wall": round(r["wall_s"] / first["wall_s"], 3)}
    report("peak resident memory of kdbench run, arms side by side", {"arms": results}, command)


if __name__ == "__main__":
    main()
