"""Device, precision, determinism and memory helpers shared by training, evaluation and fine-tuning.

Kept apart from the training loop so evaluation never imports the trainer for them.

* **The device**: ``--device auto`` (the default) is CUDA when a CUDA device is available, else
  the CPU; ``cuda:N`` is checked against the visible GPUs (:func:`resolve_device`). A run records
  the device it resolved to, never ``auto``.
* **Precision**: bf16 is used only where it is native on the run's device (CUDA devices of compute
  capability ≥ 8, CPUs with avx512_bf16 / AMX): elsewhere it is emulated and slower than
  float32. The trainable student stays float32 and runs its body under bf16 autocast; frozen
  models (the teacher, a student being evaluated) are held in bf16 instead, because autocast
  re-casts every weight on every call for parameters that need no gradient. Objective math is
  float32 whatever the model dtype (kdbench/losses.py), and float32 matmuls are pinned to IEEE
  (no TF32) at run start (:func:`pin_run_settings`): the start-up check compares float32 paths
  at float32 tolerance, and CSD's head products are read at that precision.
* **Identity**: the device kind and the precision policy (:func:`numerics`) change every float
  a run computes, so they are part of the reference fingerprint (kdbench/prepare.py): rows made
  on two kinds never share a teacher group.
* **Determinism** (``--deterministic``, :func:`pin_run_settings`): see docs/engine.md
  "Determinism" for which guarantee holds on which device.
* **Memory**: :func:`release_memory` where a phase ends, :class:`PhaseMemory` for each phase's
  peaks, :func:`peak_memory_mb` for the process's (``runs.peak_memory_mb``).
"""

from __future__ import annotations

import functools
import os
import re
import resource
from contextlib import contextmanager, nullcontext

import torch

from kdbench.allocator import CUBLAS_DETERMINISTIC, CUBLAS_ENV
from kdbench.errors import UserError

#: cpuinfo flags that select kernels with other rounding (vector width, fused multiply-add, bf16 /
#: fp16 dot products, AMX tiles): two CPUs that differ in one of them compute different floats.
NUMERICS_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


# ---------------------------------------------------------------------------------------------
# The device: which one, and what kind
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    """(model name, flags) of this machine's first CPU, from /proc/cpuinfo (empty where unreadable)."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    return model, flags


def cpu_has_native_bf16() -> bool:
    flags = _cpuinfo()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_index(device: torch.device) -> int:
    """The GPU a ``cuda`` / ``cuda:N`` device names (``cuda``: the current one)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def native_bf16(device: torch.device) -> bool:
    """bf16 is fast on CUDA devices with bf16 arithmetic (compute capability ≥ 8; emulated bf16
    on older GPUs is not counted) -- asked of the run's GPU, not the current one -- and on CPUs
    with avx512_bf16 / AMX."""
    if device.type == "cuda":
        with torch.cuda.device(cuda_index(device)):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_device(name: str) -> torch.device:
    """The concrete device a ``--device`` value names on this machine: ``auto`` is ``cuda:<the
    current GPU>`` when CUDA is available, else ``cpu``; ``cuda`` is the current GPU; ``cuda:N``
    must be a visible GPU. Every refusal is one line (:class:`UserError`)."""
    name = name.strip()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"unknown device {name!r}; valid choices: auto, cpu, cuda, cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA device is available (--device auto or cpu runs on "
                        f"the CPU)")
    n = torch.cuda.device_count()
    index = int(name[5:]) if name.startswith("cuda:") else cuda_index(torch.device("cuda"))
    if index >= n:
        raise UserError(f"device {name!r} requested but only {n} CUDA device(s) are visible "
                        f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    return torch.device("cuda", index)


def device_kind(device: torch.device) -> dict:
    """What a device is, as far as the numbers it computes go: on CUDA the GPU's name and compute
    capability; on the CPU its model name, the instruction set torch dispatches to (which
    ``ATEN_CPU_CAPABILITY`` can lower) and the :data:`NUMERICS_FLAGS` it has."""
    if device.type == "cuda":
        index = cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    model, flags = _cpuinfo()
    return {"type": device.type, "model": model, "isa": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in NUMERICS_FLAGS if f in flags]}


def cache_device(device: torch.device) -> str | dict:
    """What a disk cache's key says of the device its floats were computed on: the device type on
    the CPU (so every CPU machine keeps the entries it has, under the keys they were made with;
    CPU kinds are told apart by the teacher's content and the reference fingerprint), the whole
    :func:`device_kind` on a GPU (a cache home shared by an A100 and an H100, one home on a
    cluster, must not hand one's teacher states to the other: their roundings differ)."""
    return device.type if device.type == "cpu" else device_kind(device)


def _fp32(backend) -> str:
    """``ieee`` or ``tf32``: how a torch backend runs float32 (its ``fp32_precision`` where torch
    has that setting, else the legacy ``allow_tf32`` flag)."""
    value = getattr(backend, "fp32_precision", None)
    if value is not None:
        return value
    return "tf32" if getattr(backend, "allow_tf32", False) else "ieee"


def float32_matmul(device: torch.device) -> dict:
    """How float32 matmuls run on ``device`` now: torch's matmul precision (``highest`` is IEEE
    float32; ``high`` / ``medium`` let oneDNN and cuBLAS use TF32 or bf16 passes), and on CUDA
    cuBLAS's and cuDNN's float32 mode and ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`` when set (which
    forces TF32 whatever the flags say)."""
    out = {"precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        out.update(cuda_matmul=_fp32(torch.backends.cuda.matmul), cudnn=_fp32(torch.backends.cudnn))
        if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"):
            out["tf32_override"] = os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"]
    return out


def precision_policy(device: torch.device, bf16: bool = True) -> dict:
    """The precision a run computes in on ``device`` (``bf16``: the suite's ``bf16_autocast``):
    whether bf16 is native there, the trainable model's autocast, the frozen models' dtype and the
    float32 matmul precision."""
    native = native_bf16(device)
    return {"bf16_native": native, "autocast": "bfloat16" if bf16 and native else "off",
            "frozen_dtype": str(inference_dtype(device, bf16)).replace("torch.", ""),
            "float32_matmul": float32_matmul(device)}


def numerics(device: torch.device, bf16: bool = True) -> dict:
    """The device kind and the precision policy together: what the reference fingerprint adds to
    the teacher's content (kdbench/prepare.py) and what a run records (``config["device_kind"]``,
    ``config["precision"]``)."""
    return {"device_kind": device_kind(device), "precision": precision_policy(device, bf16)}


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast where bf16 is native; float32 elsewhere (or when ``enabled`` is False)."""
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def inference_dtype(device: torch.device, bf16: bool = True) -> torch.dtype:
    """The dtype to hold a frozen model in: bf16 where native (and wanted), else float32."""
    return torch.bfloat16 if bf16 and native_bf16(device) else torch.float32


# ---------------------------------------------------------------------------------------------
# A run's process-wide settings: device, float32 matmul precision, determinism
# ---------------------------------------------------------------------------------------------


def check_deterministic(device: torch.device, deterministic: bool) -> None:
    """Refuse ``--deterministic`` where it cannot be honoured, before anything is opened. On CUDA,
    cuBLAS is deterministic only with its workspace configured as one of
    :data:`~kdbench.allocator.CUBLAS_DETERMINISTIC` before it makes its first handle: a value the
    user set to something else is refused, and so is an unset one in a process whose CUDA was
    already initialised (library use: cuBLAS may have chosen its workspace already). The
    ``kdbench`` command sets it before torch is imported (kdbench/cli.py). On the CPU torch's
    deterministic mode has nothing to configure. An op with no deterministic implementation is
    only found when it runs (:func:`refusing_nondeterministic_ops`)."""
    if not deterministic or device.type != "cuda":
        return
    value = os.environ.get(CUBLAS_ENV)
    if value is None and torch.cuda.is_initialized():
        raise UserError(f"--deterministic cannot be honoured: CUDA was initialised in this process before "
                        f"{CUBLAS_ENV} was set (set {CUBLAS_ENV}={CUBLAS_DETERMINISTIC[0]} before starting it)")
    if value is not None and value not in CUBLAS_DETERMINISTIC:
        raise UserError(f"--deterministic cannot be honoured with {CUBLAS_ENV}={value!r}: cuBLAS is deterministic "
                        f"only with {' or '.join(CUBLAS_DETERMINISTIC)} (unset it and kdbench sets "
                        f"{CUBLAS_DETERMINISTIC[0]})")


def pin_float32_matmul() -> None:
    """float32 matmuls in IEEE float32 on every backend (no TF32, no bf16 passes)."""
    torch.set_float32_matmul_precision("highest")
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn):
        if hasattr(backend, "fp32_precision"):
            backend.fp32_precision = "ieee"
        else:  # torch without the fp32_precision settings
            backend.allow_tf32 = False


def pin_run_settings(device: torch.device, deterministic: bool = False) -> dict:
    """The process-wide settings a run computes under, set at its start: ``device`` the current
    CUDA device (so nothing opens a context on GPU 0 as well), float32 matmuls in IEEE float32,
    torch's deterministic algorithms on or off (with cuBLAS's workspace configured first, where it
    is not yet). Returns what a deterministic run records beside ``deterministic: true``
    (``config["determinism"]``; empty when off)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pin_float32_matmul()
    if deterministic and device.type == "cuda":
        os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC[0])
    torch.use_deterministic_algorithms(deterministic)
    if not deterministic:
        return {}
    from torch.utils import deterministic as torch_deterministic

    # torch then fills memory made by torch.empty with NaN, so nothing can read what was there before
    out = {"fill_uninitialized_memory": bool(torch_deterministic.fill_uninitialized_memory)}
    if device.type == "cuda":
        out["cublas_workspace_config"] = os.environ.get(CUBLAS_ENV)
    return out


@contextmanager
def restoring_settings():
    """Put back, on the way out, what :func:`pin_run_settings` changes: a run started from Python
    (tests, notebooks) leaves the process as it found it."""
    saved_precision = torch.get_float32_matmul_precision()
    saved_backends = [(b, getattr(b, "fp32_precision", None), getattr(b, "allow_tf32", None))
                      for b in (torch.backends.cuda.matmul, torch.backends.cudnn)]
    saved_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    saved_env = os.environ.get(CUBLAS_ENV)
    saved_cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved_precision)
        for backend, fp32, tf32 in saved_backends:
            if fp32 is not None:
                backend.fp32_precision = fp32
            elif tf32 is not None:
                backend.allow_tf32 = tf32
        torch.use_deterministic_algorithms(saved_det[0], warn_only=saved_det[1])
        if saved_env is None:
            os.environ.pop(CUBLAS_ENV, None)
        if saved_cuda is not None:
            torch.cuda.set_device(saved_cuda)


def nondeterministic_op(exc: BaseException) -> str | None:
    """The op named by torch's refusal to run an op that has no deterministic implementation under
    ``torch.use_deterministic_algorithms(True)``; None for any other exception."""
    if isinstance(exc, RuntimeError):
        m = re.match(r"\s*(.+?) does not have a deterministic implementation", str(exc))
        if m:
            return m.group(1)
    return None


@contextmanager
def refusing_nondeterministic_ops(device: torch.device, where: str):
    """Turn torch's refusal of an op without a deterministic implementation into one line (exit
    2): what a run does before its row exists (the fine-tune, the teacher cache, the start-up
    check) cannot be honoured under ``--deterministic`` on this device."""
    try:
        yield
    except RuntimeError as exc:
        op = nondeterministic_op(exc)
        if op is None:
            raise
        raise UserError(f"--deterministic cannot be honoured on {device.type}: {op} has no deterministic "
                        f"implementation there ({where}); run without --deterministic") from None


# ---------------------------------------------------------------------------------------------
# Memory: where a phase ends, each phase's peak, the process's peak
# ---------------------------------------------------------------------------------------------

_host_peak_kb = 0  # the process's peak resident memory before the last reset of the kernel's mark


def _vm_hwm_kb() -> int | None:
    """The kernel's high-water mark of this process's resident memory (VmHWM, KiB), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_host_peak() -> bool:
    """Start a new window of the kernel's resident-memory high-water mark (``5`` written to
    /proc/self/clear_refs, Linux ≥ 4.0), keeping the old mark in the process's peak first; False
    where the kernel refuses (the mark then keeps counting from the process's start)."""
    global _host_peak_kb
    before = _vm_hwm_kb()
    if before is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _host_peak_kb = max(_host_peak_kb, before)
    return True


def peak_memory_mb() -> float | None:
    """The process's peak resident memory in MB, on every device (``runs.peak_memory_mb``; GPU
    memory is the ``cost`` artifact's, per phase): the kernel's high-water mark, and what it held
    before :func:`reset_host_peak` started a new window."""
    try:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    except (OSError, ValueError):
        ru = 0
    peak = max(ru, _vm_hwm_kb() or 0, _host_peak_kb)
    return peak / 1024 if peak else None


class PhaseMemory:
    """Each phase's peak memory: host resident memory (VmHWM, reset at the phase's start) and, on
    CUDA, the caching allocator's allocated and reserved peaks (``reset_peak_memory_stats`` at the
    phase's start). A phase may run inside another (validation inside training): the outer
    phase's window is closed before the inner one opens and a new one opened after it, so each
    figure belongs to one phase only. :meth:`to_dict` is the ``cost`` artifact's ``memory``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, float]] = {}
        self.host_per_phase = True  # False: the kernel's mark could not be reset (peaks since the process started)
        self._open: list[str] = []

    def _fold(self, name: str) -> None:
        peaks = self.phases.setdefault(name, {})
        hwm = _vm_hwm_kb()
        read = {"host_rss_peak_mb": None if hwm is None else hwm / 1024}
        if self.device.type == "cuda":
            read["cuda_allocated_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            read["cuda_reserved_peak_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
        for key, value in read.items():
            if value is not None:
                peaks[key] = max(peaks.get(key, 0.0), value)

    def _reset(self) -> None:
        if not reset_host_peak():
            self.host_per_phase = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def phase(self, name: str):
        if self._open:
            self._fold(self._open[-1])
        self._reset()
        self._open.append(name)
        try:
            yield
        finally:
            self._open.pop()
            self._fold(name)
            if self._open:
                self._reset()

    def to_dict(self) -> dict:
        return {"host_rss": "per phase" if self.host_per_phase else "since the process started",
                **{name: {k: round(v, 1) for k, v in peaks.items()} for name, peaks in self.phases.items()}}


def release_memory() -> None:
    """Collect garbage and hand freed memory back where a phase ends: heap pages to the OS (glibc
    ``malloc_trim``; mimalloc's forced purge where it is the allocator, kdbench/allocator.py),
    and the CUDA caching allocator's unused blocks to the driver (``empty_cache``). After
    training, the optimiser state and gradients would otherwise stay resident while evaluation
    loads the teacher, and packed batches, whose lengths change every step, would leave the
    caching allocator's segments fragmented under the next phase."""
    import gc

    from kdbench.allocator import purge

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
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
