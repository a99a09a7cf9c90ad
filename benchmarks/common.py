"""Shared set-up for the benchmarks: the micro models and data, measured side by side.

Every benchmark prints the ratios it measured in one process (so machine load affects all
arms alike), the machine, and the command that reproduces it. Run them alone on the machine:
on 2 cores a second torch process slows a running one ~10x.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Measure what the kdbench command runs with: mimalloc preloaded where installed
# (kdbench/allocator.py; KDBENCH_ALLOCATOR=system measures glibc's malloc instead).
from kdbench.allocator import bound_kernel_caches, in_use as allocator_in_use, kernel_caches, reexec_with_mimalloc  # noqa: E402,E501

bound_kernel_caches()
reexec_with_mimalloc()

import torch  # noqa: E402


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "allocator": allocator_in_use(), "kernel_caches": kernel_caches(),
            "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_device_option(ap) -> None:
    """``--device``, as `kdbench run` takes it (kdbench/device.py ``resolve_device``)."""
    ap.add_argument("--device", default="auto",
                    help="auto (default): cuda when a CUDA device is available, else cpu; or cpu, cuda, cuda:N")


def bench_device(name: str) -> torch.device:
    """The device ``--device`` names here, with a run's settings pinned on it (the current CUDA
    device, IEEE float32 matmuls: kdbench/device.py ``pin_run_settings``); a device this machine
    lacks ends the benchmark with the run's one-line message."""
    from kdbench.device import pin_run_settings, resolve_device
    from kdbench.errors import UserError

    try:
        device = resolve_device(name)
    except UserError as exc:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {exc}") from None
    pin_run_settings(device)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously), so a clock read after
    it times what was asked before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


V1_KEEP_EVERY = 2  # the benchmark student: blocks 0, 2, ..., 28, 29 of the base teacher (micro v1's)


def micro_setup(device: torch.device, n_examples: int | None = None):
    """The real SmolLM2-135M-Instruct teacher (bf16 where native), a fresh 16-block student recipe
    (every other block plus the last: micro v1's pair, on which the baseline loop's reference
    figures in docs/performance.md were measured -- fixed, so ratios from every machine and every
    version of the engine compare like with like, and no fine-tune is needed),
    the tokenizer and the encoded micro training examples ``[(id, Encoded)]``."""
    from kdbench.data.batching import encode
    from kdbench.data.micro import build_splits
    from kdbench.device import inference_dtype
    from kdbench.models import build_student, layer_subset, load_causal_lm, load_tokenizer, prepare_teacher
    from kdbench.suites import MICRO

    path = prepare_teacher(MICRO.teacher)
    tok = load_tokenizer(path)
    base = load_causal_lm(path)
    keep = layer_subset(base.config.num_hidden_layers, V1_KEEP_EVERY)
    student0 = build_student(base, keep)
    del base
    teacher = load_causal_lm(path, dtype=inference_dtype(device)).to(device).eval().requires_grad_(False)
    train = build_splits(MICRO.data["valid_frac"], MICRO.data["test_frac"])["train"]
    spec = MICRO.train
    enc = [(e.id, encode(tok, e.prompt, e.references[0], spec.max_prompt_tokens, spec.max_tokens)) for e in train]
    if n_examples:
        enc = enc[:n_examples]

    def new_student():
        return copy.deepcopy(student0).to(device).train()

    return teacher, new_student, tok, enc, path


def cached_teacher(teacher, enc, batch_size: int, batches: int, pad_id: int, device: torch.device):
    """A teacher cache of the examples in the first ``batches`` packed batches (seed 0), built in
    a fresh temporary $KDBENCH_CACHE, as a CachedTeacher: what a run reads once its cache is warm."""
    import tempfile

    from kdbench.engine import teacher_cache
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.teacher import CachedTeacher

    order = PackedBatches(enc, batch_size, 0, pad_id)
    used = {i for _ in range(batches) for i in next(order).example_ids}
    os.environ["KDBENCH_CACHE"] = tempfile.mkdtemp(prefix="kdbench-bench-")
    teacher_cache.get_or_build("bench", {"bench": True}, teacher, [(i, e) for i, e in enc if i in used], device,
                               progress=False, log=lambda *_: None)
    return CachedTeacher(teacher_cache.lookup("bench"), device)


def report(name: str, results: dict, command: str) -> None:
    out = {"benchmark": name, "machine": machine(), "results": results, "command": command,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(out, indent=2, default=str))
