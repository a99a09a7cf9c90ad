"""Precision and device helpers shared by training, evaluation and fine-tuning.

Kept apart from the training loop so evaluation never imports the trainer for them.

* bf16 is used only where it is native (CUDA with bf16, CPUs with avx512_bf16 / AMX): elsewhere
  it is emulated and slower than float32;
* the trainable student stays float32 and runs its body under bf16 autocast; frozen models
  (the teacher, a student being evaluated) are held in bf16 instead, because autocast re-casts
  every weight on every call for parameters that need no gradient;
* objective math is float32 whatever the model dtype (kdbench/losses.py).
"""

from __future__ import annotations

import os
import resource
from contextlib import nullcontext

import torch


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """bf16 is fast on CUDA with bf16 support and on CPUs with avx512_bf16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast where bf16 is native; float32 elsewhere (or when ``enabled`` is False)."""
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def inference_dtype(device: torch.device, bf16: bool = True) -> torch.dtype:
    """The dtype to hold a frozen model in: bf16 where native (and wanted), else float32."""
    return torch.bfloat16 if bf16 and native_bf16(device) else torch.float32


def peak_memory_mb(device: torch.device | None = None) -> float | None:
    """The process's peak resident memory in MB (CPU, ``runs.peak_memory_mb``), or the peak
    allocated CUDA memory on a CUDA device."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except (OSError, ValueError):
        return None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS where a phase ends (glibc
    ``malloc_trim``; mimalloc's forced purge where it is the allocator, kdbench/allocator.py):
    after training, the optimiser state and gradients would otherwise stay in the process's
    resident memory while evaluation loads the teacher."""
    import gc

    from kdbench.allocator import purge

    gc.collect()
    if purge():
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_threads() -> None:
    """Use every core unless the user pinned a number (``OMP_NUM_THREADS``; a sweep's workers
    pin theirs so that they split the machine instead of oversubscribing it)."""
    pinned = os.environ.get("OMP_NUM_THREADS")
    if pinned and pinned.isdigit() and int(pinned) > 0:
        torch.set_num_threads(int(pinned))
    else:
        torch.set_num_threads(os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a clear error where CUDA is asked for and absent."""
    from kdbench.errors import UserError

    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UserError(f"unknown device {name!r}; valid choices: cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)
