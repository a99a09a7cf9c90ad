"""The memory a ``kdbench`` process keeps: mimalloc where it is installed, and bounded kernel caches.

Why: a training step allocates and frees hundreds of tensors whose sizes change with every
batch (packed sequences have no fixed shape). glibc's malloc serves the smaller ones from heaps
it cannot return while anything near the top is live, and every freed block above its mmap
threshold is unmapped and faulted in again on the next step (page faults are expensive on
virtual machines). mimalloc (Microsoft, MIT) keeps per-size free lists and reuses pages.
Measured on the standard run, same machine, same command, one after the other
(``benchmarks/bench_memory.py``, docs/performance.md): wall 171 → 140 s, peak resident
memory 4,134 → 3,780 MB, and the run's 390 samples identical — the allocator changes where
tensors live, never what is computed.

How: a malloc replacement must be loaded when the process starts (``LD_PRELOAD``). The
``kdbench`` command and ``python -m kdbench`` re-execute themselves once, before torch is
imported, with the library preloaded (:func:`reexec_with_mimalloc`); a process started from
one (a sweep's worker) inherits it. ``KDBENCH_ALLOCATOR=system`` keeps the system allocator.
Only on Linux, only when the ``cmeel-mimalloc`` wheel is installed (a dependency of kdbench
there); anywhere else nothing changes. Library code (``import kdbench``) never re-executes.

**Kernel caches.** torch's CPU kernels for bf16 (and, on some machines, float32) matmuls are
oneDNN primitives, compiled for one operand shape and kept in two caches of 1,024 entries each:
oneDNN's primitive cache and ideep's (torch's oneDNN wrapper) computation cache. A packed batch
has a new length every step, so every step adds a few dozen primitives and their buffers, and
the resident set climbs for as long as the run lasts (pytorch/pytorch#27971; oneDNN#489).
:func:`bound_kernel_caches` sets both capacities before torch is imported
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` and ``LRU_CACHE_CAPACITY``; values already in the
environment win). Measured on the standard run (2-core Xeon with AMX, bf16;
``benchmarks/bench_memory.py``; docs/performance.md, "bounded kernel caches"), the libraries' capacities
against these, one after the other: peak 3,938 → 3,253 MB, training 43 → 42 s, the 390 samples
identical. A oneDNN capacity of 0 recompiles every primitive (training 5× slower); ideep's
must stay ≥ 1 (0 segfaults torch 2.13).

**Purging.** mimalloc hands freed memory back to the OS (``MADV_DONTNEED``) once it has been
free for ``MIMALLOC_PURGE_DELAY`` ms (mimalloc 3.4: 1,000). A training step takes about a
second and frees its gradients (model-sized, dropped before the next forward to keep them out
of the step's peak) and its activations, so at that delay every step faults the same pages in
again: a 20-step profile made 345k minor page faults (88k with purging off), and zero-filling
the tied embedding's 113 MB gradient took 53 ms a step (``torch.profiler``; docs/performance.md,
"mimalloc's purge delay"). kdbench sets the delay to
:data:`PURGE_DELAY_MS` (a value you set is kept), so a phase reuses its own pages, and
:func:`kdbench.device.release_memory` forces the purge where a phase ends (after the start-up
check, each validation, training), so what one phase freed is not resident under the next.
Never purging (``-1``) is faster still but keeps the training memory resident under evaluation:
peak 2,860 -> 3,400 MB on the standard run.

**cuBLAS's workspace.** cuBLAS is deterministic only with one of two workspace configurations
(:data:`CUBLAS_DETERMINISTIC`), read from ``CUBLAS_WORKSPACE_CONFIG`` when it makes its first
handle; ``--deterministic`` needs it. The ``kdbench`` command sets it for such a run before torch
is imported (:func:`deterministic_cublas`, kdbench/cli.py), so no cuBLAS call can come first; a
value you set is kept, and refused by the run where it is not deterministic
(kdbench/device.py ``check_deterministic``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "KDBENCH_ALLOCATOR"  # "mimalloc" (default) | "system"
_REEXECUTED = "_KDBENCH_ALLOCATOR_REEXEC"  # set in the re-executed process: never loop
_LIB = ("cmeel.prefix", "lib", "libmimalloc.so.3")
# Enough for one step's shapes (five weight shapes x forward, input and weight gradients) so
# that the 24 blocks of a step share their primitives; few enough that old steps' are dropped.
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "1"}
#: mimalloc's purge delay (ms) for kdbench processes: longer than a training step, so steps reuse
#: their pages; phases end with a forced purge (device.release_memory). A positive value is
#: needed: with -1 mimalloc never purges, even when asked to.
PURGE_DELAY_MS = "10000"
CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
#: The workspace configurations under which cuBLAS is deterministic (NVIDIA's cuBLAS docs, "Results
#: reproducibility"; torch checks for exactly these): 8 buffers of 4 MiB (kdbench's), or 8 of 16 KiB.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def bound_kernel_caches() -> None:
    """Bound oneDNN's and ideep's shape-keyed caches (see the module docstring); call before torch
    is imported. A value the user set is kept."""
    for name, value in KERNEL_CACHES.items():
        os.environ.setdefault(name, value)


def deterministic_cublas() -> None:
    """Configure cuBLAS's workspace for deterministic kernels (a value the user set is kept); call
    before torch is imported, for a run with ``--deterministic``. Inert without CUDA."""
    os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC[0])


def kernel_caches() -> dict[str, str | None]:
    """The cache capacities this process runs with (None: the library's default, 1,024)."""
    return {name: os.environ.get(name) for name in KERNEL_CACHES}


def mimalloc_path() -> str | None:
    """The installed ``libmimalloc.so.3`` (from the ``cmeel-mimalloc`` wheel), or None."""
    for entry in sys.path:
        lib = Path(entry or ".", *_LIB)
        if lib.is_file():
            return str(lib.resolve())
    return None


def purge_delay() -> str | None:
    """mimalloc's purge delay in ms for this process (None when mimalloc is not its allocator)."""
    return os.environ.get("MIMALLOC_PURGE_DELAY", "1000 (mimalloc default)") if in_use() == "mimalloc" else None


def purge() -> bool:
    """Hand the memory mimalloc holds free back to the OS now (``mi_collect(true)``); False when
    mimalloc is not this process's allocator."""
    if in_use() != "mimalloc":
        return False
    import ctypes

    try:
        collect = ctypes.CDLL(None).mi_collect
    except (OSError, AttributeError):
        return False
    collect.argtypes, collect.restype = [ctypes.c_bool], None
    collect(True)
    return True


def in_use() -> str:
    """``"mimalloc"`` when this process has the library mapped, else ``"system"``."""
    try:
        with open("/proc/self/maps") as fh:
            return "mimalloc" if any("libmimalloc" in line for line in fh) else "system"
    except OSError:
        return "system"


def wanted() -> str:
    choice = os.environ.get(ENV, "mimalloc").strip().lower() or "mimalloc"
    if choice not in ("mimalloc", "system"):
        print(f"kdbench: warning: {ENV}={os.environ[ENV]!r} is not one of mimalloc, system; using the system "
              f"allocator", file=sys.stderr)
        return "system"
    return choice


def reexec_with_mimalloc() -> None:
    """Replace this process by itself with mimalloc preloaded, when wanted and possible; else return.

    Called first thing by the command-line entry points (kdbench/__main__.py, cli.entry), before
    anything big is imported, so the exec costs only an interpreter start.
    """
    if sys.platform != "linux" or os.environ.get(_REEXECUTED) or wanted() != "mimalloc":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    lib = mimalloc_path()
    if lib is None or "libmimalloc" in preload:
        return
    env = {"MIMALLOC_PURGE_DELAY": PURGE_DELAY_MS, **os.environ,
           "LD_PRELOAD": f"{lib}:{preload}" if preload else lib, _REEXECUTED: "1"}
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # cannot exec (odd sandbox): run on with the system allocator
        return
