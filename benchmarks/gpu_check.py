#!/usr/bin/env python
"""The prepared single-GPU check: one run on one GPU answers what kdbench has only measured on CPUs.

Run it once on a machine with one GPU (an H100: about 10 minutes), from the repository root, with
nothing but torch, transformers, numpy, safetensors and kdbench installed (no hub access: every
model is built from its config with seeded random weights; ``trl``, if it imports, adds one arm)::

    python benchmarks/gpu_check.py --out gpu_check.json      # cuda if available, else cpu
    python benchmarks/gpu_check.py --tiny --out tiny.json    # every section on the CPU, tiny shapes, < 1 min

It writes ONE JSON file (``--out``): a header, one entry per section with every figure, ``checks``
(every assertion made), ``failed_assertions`` and ``incomplete`` (what a time box cut short). The
file is rewritten whole after every item, so a run killed or timed out still leaves what it
measured. Exit code: 0 all assertions held, 1 an assertion failed (the list is in the JSON and on
stderr) or a section raised, 3 nothing failed but a time box cut something short, 2 the device
asked for is not there.

Shapes (``--tiny`` replaces them with 2-5 layer, d 32-64, V 512 models):

* **micro**: SmolLM2-135M's Llama config (30 layers, d 576, 9 heads / 3 KV heads, intermediate
  1,536, V 49,152, tied embeddings); the student is the suite's 24-block subset built by
  ``kdbench.models.build_student`` (blocks 2, 7, 12, 17, 22, 27 dropped);
* **paper**: ``GPT2Config(n_layer=48, n_embd=1600, n_head=25)`` teacher (GPT-2 XL's shape) and
  ``GPT2Config()`` student (GPT-2 base), V 50,257, dropout off (so that arms compare losses).

Data: 200 (prompt, response) token lengths of Dolly (benchmarks/data/dolly_lengths.json, its header
says how they were made), truncated as ``encode`` truncates (prompt 256, sequence 512), random
token ids, packed 8 per batch by ``kdbench.engine.batches.PackedBatches``.

Sections (``--sections``; each time-boxed, see BUDGET_S):

0. environment: GPU / CPU, versions, float32 matmul precision and TF32 flags, allocator and
   determinism variables, native bf16, SDPA backends enabled and the attention kernel a packed
   and a padded forward actually ran;
1. correctness (micro): kdbench's start-up check for every registered objective's default setting;
   CPU vs device in IEEE float32 (hidden states, loss, gradients); packed vs per-sequence hidden
   states; cached vs live teacher (a teacher-cache entry built in a temporary KDBENCH_CACHE); reruns
   and resume (2 steps + state save/load + 2 steps vs 4 straight) with and without
   ``torch.use_deterministic_algorithms(True)``;
2. training (paper): tokens/s, s/step, peak memory and first losses of (a) kdbench's ``train()``
   with the CPU's step settings (as shipped before the step was tuned per device: 256-row loss
   chunks in 1 MB row blocks, activation checkpointing on, dense packed attention) and the teacher
   cache, (b) (a) with activation checkpointing off, (c) tuned: what
   ``kdbench.engine.tuning.step_tuning`` chooses for the device (on CUDA 2,048-row chunks in one row
   block, per-sequence attention, checkpointing from the memory estimate), (d) (c) with the live
   teacher, (e) a hand-written bf16 loop (padded batch, full logits, float32 forward KL, fused
   AdamW), (f) TRL's GKDTrainer if trl imports; then CSD (a) and (c), (c) with dense attention,
   and the host synchronisations per step (benchmarks/count_syncs.py), CPU settings vs tuned;
3. generation (paper): student and teacher at two batch sizes, kdbench's prefill + decode vs HF
   ``generate``, tokens/s, measured KV-cache bytes per token, projected resident KV for S-NI / UnNI;
4. head precision: the head products at 2,048 × 50,257 × 768 in IEEE float32, TF32 (CUDA) and
   bf16: time and error against float64;
5. distributed (paper): ``python -m torch.distributed.run --standalone --nproc-per-node 1
   benchmarks/dist_check.py`` in a subprocess (stopped, with its worker, at the time box; its
   output's tail kept under ``launch``), NCCL on CUDA (gloo on the CPU): the process group joined,
   the paper pair with the live teacher, section 2's steps (forward KL, one step tuning) trained
   by ``train()`` three ways from the same weights, after one unrecorded pass over the same steps
   (~1 minute on an H100, a 2-minute box): (a) the plain LM, (b) ``DDP(StudentBody(lm))``,
   (c) FSDP2 (``kdbench.engine.fsdp.shard_student``); tokens/s, s/step, peak GPU memory (reset
   between arms) or the host RSS peak, the losses, and (b)'s and (c)'s per-step losses against
   (a)'s (≤ 1e-3 relative under bf16 autocast, ≤ 1e-5 in float32: one process, the same
   operations); backend, world size, torch / NCCL versions. Skipped (recorded, not failed) where
   torch.distributed or the device's backend is missing. benchmarks/dist_check.py runs alone too.

Nothing here is measured on a CPU for its own sake: on a CPU the device-only comparisons are
recorded as skipped (or, CPU vs "device", trivially equal) with the reason.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before torch initialises CUDA: cuBLAS reads it when its handle is made
    _CUBLAS_PRESET = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
else:
    _CUBLAS_PRESET = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DOLLY_LENGTHS = Path(__file__).resolve().parent / "data" / "dolly_lengths.json"

import torch  # noqa: E402

SECTIONS = {0: "environment", 1: "correctness", 2: "training", 3: "generation", 4: "head_precision",
            5: "distributed"}
#: Time box per section, seconds: on an H100 the whole run stays under 10 minutes (585 s + start-up).
BUDGET_S = {0: 30, 1: 120, 2: 210, 3: 75, 4: 30, 5: 120}
TINY_BUDGET_S = {0: 20, 1: 40, 2: 40, 3: 20, 4: 15, 5: 40}

# Tolerances (relative): the start-up check's own (kdbench/engine/check.py) and the brief's.
HIDDEN_RTOL = 1e-4
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
ARMS_FIRST_LOSS_RTOL = 1e-5      # (a), (b), (c): checkpointing, loss chunking, per-sequence attention: rounding only
HAND_LOOP_KL_RTOL = 1e-2         # kdbench's first-step KL vs the hand loop's (bf16 logits there)
CACHED_BF16_RTOL = 2e-2          # cached vs live bf16 teacher logits (another batch composition)
TARGETS = {"c_over_e": 2.0, "c_over_f": 3.0}  # H100 targets, reported, not asserted
PROJECTION = {"sni": 1694, "unni": 10_000, "batch": 32, "tokens": 250}

ENV_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG",
            "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE", "CUDA_LAUNCH_BLOCKING", "CUDA_VISIBLE_DEVICES",
            "LD_PRELOAD", "MIMALLOC_PURGE_DELAY", "OMP_NUM_THREADS", "KDBENCH_ALLOCATOR",
            "KDBENCH_ACTIVATION_CHECKPOINTING", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# The report: one JSON file, rewritten atomically after every item; assertions
# ----------------------------------------------------------------------------------------------


def jsonable(x):
    """``x`` as plain JSON: non-finite floats become strings ("nan", "inf"), tensors numbers or lists."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, torch.Tensor):
        return jsonable(x.item() if x.numel() == 1 else x.tolist())
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if hasattr(x, "to_dict"):
        return jsonable(x.to_dict())
    if isinstance(x, (torch.device, torch.dtype, Path)):
        return str(x)
    try:
        return jsonable(float(x)) if isinstance(x, (int, float)) or hasattr(x, "__float__") else str(x)
    except (TypeError, ValueError):
        return str(x)


class Report:
    """The check's one output file and its assertions.

    ``check(name, ok, **detail)`` and ``check_le(name, value, limit, **detail)`` record an
    assertion (a non-finite value fails ``check_le``); a failed one goes to ``failed_assertions``
    and to stderr at once. ``finish()`` writes the file a last time and returns the exit code."""

    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        self.data = {"header": jsonable(header), "sections": {}, "checks": [], "failed_assertions": [],
                     "incomplete": [], "summary": {}, "finished": False}
        self.flush()

    def section(self, key: str) -> dict:
        sec = self.data["sections"].setdefault(key, {})
        sec["status"] = "running"
        return sec

    def check(self, name: str, ok, **detail) -> bool:
        ok = bool(ok)
        entry = {"name": name, "ok": ok, **jsonable(detail)}
        self.data["checks"].append(entry)
        if not ok:
            self.data["failed_assertions"].append(entry)
            print(f"[gpu_check] ASSERTION FAILED: {name} {json.dumps(entry)}", file=sys.stderr, flush=True)
        self.flush()
        return ok

    def check_le(self, name: str, value, limit: float, **detail) -> bool:
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        return self.check(name, math.isfinite(v) and v <= limit, value=v, limit=limit, **detail)

    def incomplete(self, what: str) -> None:
        self.data["incomplete"].append(what)
        log(f"incomplete: {what}")
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(jsonable(self.data), indent=1))
        os.replace(tmp, self.path)

    @property
    def exit_code(self) -> int:
        if self.data["failed_assertions"]:
            return 1
        return 3 if self.data["incomplete"] else 0

    def finish(self) -> int:
        code = self.exit_code
        self.data["finished"] = True
        self.data["exit_code"] = code
        self.flush()
        failed = self.data["failed_assertions"]
        if failed:
            print(f"[gpu_check] {len(failed)} assertion(s) failed:", file=sys.stderr)
            for f in failed:
                print(f"  - {f['name']}: {json.dumps({k: v for k, v in f.items() if k not in ('name', 'ok')})}",
                      file=sys.stderr)
        elif self.data["incomplete"]:
            print(f"[gpu_check] no assertion failed, but time boxes cut short: {self.data['incomplete']}",
                  file=sys.stderr)
        log(f"wrote {self.path} (exit code {code})")
        return code


# ----------------------------------------------------------------------------------------------
# Time boxes: a section gets an alarm; items inside it are skipped once too little time is left
# ----------------------------------------------------------------------------------------------


class TimeBox(BaseException):
    """A section's time box ran out (BaseException: kdbench's ``except Exception`` does not eat it)."""


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.expired = False

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)


@dataclass
class Ctx:
    args: argparse.Namespace
    device: torch.device
    tiny: bool
    shapes: SimpleNamespace
    report: Report
    tmp: Path
    pairs: list
    clock: Clock = field(default_factory=lambda: Clock(math.inf))
    cache: dict = field(default_factory=dict)   # models and data shared by sections


def run_section(ctx: Ctx, key: int, fn, budget_s: float) -> None:
    name = f"{key}_{SECTIONS[key]}"
    sec = ctx.report.section(name)
    sec["budget_s"] = budget_s
    clock = ctx.clock = Clock(budget_s)
    log(f"section {name} (time box {budget_s:.0f} s)")

    def alarm(signum, frame):
        clock.expired = True
        raise TimeBox(f"section {name}: time box of {budget_s:.0f} s ran out")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    try:
        fn(ctx, sec)
        sec["status"] = "done"
    except BaseException as exc:  # noqa: BLE001 - a time box, a bug, Ctrl-C: each recorded
        if clock.expired:
            sec["status"] = "timed out"
            ctx.report.incomplete(f"{name}: time box of {budget_s:.0f} s ran out")
        elif isinstance(exc, KeyboardInterrupt):
            sec["status"] = "interrupted"
            raise
        else:
            sec["status"] = "error"
            sec["error"] = traceback.format_exc(limit=8)
            ctx.report.check(f"{name}: runs without an exception", False, error=f"{type(exc).__name__}: {exc}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        sec["wall_s"] = round(time.monotonic() - clock.t0, 2)
        ctx.report.flush()
        free_memory(ctx.device)


def item(ctx: Ctx, sec: dict, name: str, fn, *, need_s: float = 0.0):
    """Run ``fn(out)`` with ``out = sec[name]`` (a dict it fills; ``sec`` is a section's dict or
    one inside it); skipped when less than ``need_s`` seconds of the section's time box are left;
    an exception fails the check ``<name>: runs without an exception``."""
    out = sec.setdefault(name, {})
    left = ctx.clock.left()
    if left < need_s:
        out["skipped"] = f"time box: {left:.0f} s left in the section, the item needs ~{need_s:.0f} s"
        ctx.report.incomplete(f"{name}: skipped ({out['skipped']})")
        return None
    t0 = time.monotonic()
    try:
        return fn(out)
    except BaseException as exc:  # noqa: BLE001
        if ctx.clock.expired or isinstance(exc, (KeyboardInterrupt, TimeBox)):
            out["status"] = "cut by the time box" if ctx.clock.expired else "interrupted"
            raise
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=6)
        ctx.report.check(f"{name}: runs without an exception", False, error=out["error"])
        return None
    finally:
        out["wall_s"] = round(time.monotonic() - t0, 3)
        ctx.report.flush()


# ----------------------------------------------------------------------------------------------
# Small helpers: timing, memory, precision, comparisons
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peaks(device: torch.device) -> None:
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peaks(device: torch.device) -> dict:
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_now_mb": rss_mb()}
    if device.type == "cuda":
        out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["gpu_max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64, on the CPU (``b`` is the reference)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.numel() else 0.0


def rel_scalar(a: float, b: float) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def precision_api() -> str:
    return "fp32_precision" if hasattr(torch.backends.cuda.matmul, "fp32_precision") else "allow_tf32"


@contextlib.contextmanager
def cuda_matmul(mode: str):
    """float32 CUDA matmuls in ``mode`` ("ieee" or "tf32") inside the block, through torch's new
    ``fp32_precision`` API where it exists (mixing it with the legacy ``allow_tf32`` flag is an
    error in recent torch), else the legacy flag."""
    m = torch.backends.cuda.matmul
    if precision_api() == "fp32_precision":
        old = m.fp32_precision
        m.fp32_precision = mode
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            m.allow_tf32 = old


@contextlib.contextmanager
def ieee_float32(device: torch.device):
    """IEEE float32 matmuls and autocast off: the comparisons' arithmetic."""
    with cuda_matmul("ieee"), torch.autocast(device_type=device.type, enabled=False):
        yield


def head_logits(hidden: torch.Tensor, head) -> torch.Tensor:
    """float32 ``hidden @ Wᵀ + b`` (what kdbench's losses make per chunk)."""
    return torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                      None if head.bias is None else head.bias.float())


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` (synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


# ----------------------------------------------------------------------------------------------
# Shapes, data and models
# ----------------------------------------------------------------------------------------------


NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def make_shapes(tiny: bool) -> SimpleNamespace:
    from transformers import GPT2Config, LlamaConfig

    if tiny:
        v = 512
        micro = LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        return SimpleNamespace(
            name="tiny", micro=micro, keep=[i for i in range(5) if i % 5 != 2],
            teacher=GPT2Config(vocab_size=v, n_positions=128, n_embd=64, n_layer=3, n_head=4, bos_token_id=v - 1,
                               eos_token_id=v - 1, **NO_DROPOUT),
            student=GPT2Config(vocab_size=v, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=v - 1,
                               eos_token_id=v - 1, **NO_DROPOUT),
            n_examples=48, length_div=8, max_prompt=32, max_tokens=64, batch=8, warmup=1, timed=2,
            gen_batches=(2, 4), gen_new=6, head=(64, v, 32))
    from kdbench.suites.embedded import STUDENT_BLOCKS

    micro = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return SimpleNamespace(
        name="full", micro=micro, keep=list(STUDENT_BLOCKS),
        teacher=GPT2Config(n_layer=48, n_embd=1600, n_head=25, **NO_DROPOUT),   # GPT-2 XL's shape, V 50,257
        student=GPT2Config(**NO_DROPOUT),                                        # GPT-2 base's
        n_examples=200, length_div=1, max_prompt=256, max_tokens=512, batch=8, warmup=3, timed=25,
        gen_batches=(32, 256), gen_new=64, head=(2048, 50257, 768))


def load_pairs(length_div: int) -> list[tuple[int, int]]:
    pairs = json.loads(DOLLY_LENGTHS.read_text())["pairs"]
    return [(max(1, p // length_div), max(1, r // length_div)) for p, r in pairs]


def make_examples(pairs, n: int, vocab: int, max_prompt: int, max_tokens: int, seed: int):
    """``[(id, Encoded)]`` with Dolly's lengths, cut as ``encode`` cuts them (prompt left-truncated
    to ``max_prompt``, sequence to ``max_tokens``), random token ids."""
    from kdbench.data.batching import Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, r) in enumerate(pairs[:n]):
        p = min(p, max_prompt)
        total = max(p + 1, min(p + r, max_tokens))
        ids = torch.randint(0, vocab, (total,), generator=g).tolist()
        out.append((f"dolly:{i}", Encoded(ids, p)))
    return out


def build_model(cls, cfg, seed: int, device: torch.device):
    """``cls(cfg)`` with seeded random weights, made on ``device`` (float32)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def micro_models(ctx: Ctx):
    """(teacher on the CPU in float32, student on the CPU in float32, examples), built once."""
    if "micro" not in ctx.cache:
        from transformers import LlamaForCausalLM

        from kdbench.models import build_student

        S = ctx.shapes
        teacher = build_model(LlamaForCausalLM, S.micro, 0, torch.device("cpu")).eval().requires_grad_(False)
        student = build_student(teacher, S.keep)
        examples = make_examples(ctx.pairs, S.n_examples, S.micro.vocab_size, S.max_prompt, S.max_tokens, seed=10)
        ctx.cache["micro"] = (teacher, student, examples)
    return ctx.cache["micro"]


def paper_models(ctx: Ctx):
    """(teacher on the device in its inference dtype, student template on the device in float32,
    examples), built once and shared by sections 2 and 3."""
    if "paper" not in ctx.cache:
        from transformers import GPT2LMHeadModel

        from kdbench.device import inference_dtype

        S, dev = ctx.shapes, ctx.device
        teacher = build_model(GPT2LMHeadModel, S.teacher, 1, dev)
        teacher = teacher.to(inference_dtype(dev)).eval().requires_grad_(False)
        student = build_model(GPT2LMHeadModel, S.student, 2, dev)
        examples = make_examples(ctx.pairs, S.n_examples, S.student.vocab_size, S.max_prompt, S.max_tokens, seed=20)
        ctx.cache["paper"] = (teacher, student, examples)
    return ctx.cache["paper"]


def cpu_model_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# Section 0: environment
# ----------------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _get(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a flag that cannot be read is recorded as such
        return f"unreadable: {type(exc).__name__}: {exc}"


def git_commit() -> str | None:
    """The checkout's commit, read from .git (no git command needed)."""
    git = ROOT / ".git"
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head
    ref = head.split(":", 1)[1].strip()
    if (git / ref).is_file():
        return (git / ref).read_text().strip()
    for line in (git / "packed-refs").read_text().splitlines():
        if line.endswith(" " + ref):
            return line.split()[0]
    return None


def attention_ops(model, kwargs: dict, device: torch.device, autocast: bool) -> list[str]:
    """The attention operators one forward ran (torch profiler, CPU-side op names: which SDPA
    backend dispatch chose, e.g. aten::_scaled_dot_product_efficient_attention)."""
    from torch.profiler import ProfilerActivity, profile

    from kdbench.device import autocast_context

    ctxm = autocast_context(device) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctxm, profile(activities=[ProfilerActivity.CPU]) as prof:
        model.base_model(**kwargs, use_cache=False)
    return sorted({e.name for e in prof.events() if "attention" in e.name.lower() or "scaled_dot" in e.name.lower()})


def section_environment(ctx: Ctx, sec: dict) -> None:
    import numpy
    import transformers

    from kdbench import device as kd_device
    from kdbench import losses
    from kdbench.engine import trainer

    dev = ctx.device
    sec["device"] = str(dev)
    sec["versions"] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                       "cudnn": _get(torch.backends.cudnn.version), "transformers": transformers.__version__,
                       "numpy": numpy.__version__, "safetensors": _version("safetensors"), "trl": _version("trl"),
                       "kdbench": _version("kdbench")}
    sec["cpu"] = {"model": cpu_model_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "native_bf16": kd_device.cpu_has_native_bf16()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        sec["gpu"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability(dev)),
                      "total_memory_gib": p.total_memory / 2**30, "multiprocessors": p.multi_processor_count,
                      "device_count": torch.cuda.device_count(),
                      "allocator_backend": _get(torch.cuda.get_allocator_backend)}
    else:
        sec["gpu"] = None
    sec["precision"] = {
        "float32_matmul_precision": _get(torch.get_float32_matmul_precision),
        "api": precision_api(),
        "fp32_precision": {name: _get(lambda o=obj: o.fp32_precision) for name, obj in (
            ("global", torch.backends), ("cuda.matmul", torch.backends.cuda.matmul),
            ("cudnn", torch.backends.cudnn), ("mkldnn.matmul", getattr(torch.backends.mkldnn, "matmul", None)))
            if obj is not None and hasattr(obj, "fp32_precision")},
        "legacy_allow_tf32": {"cuda.matmul": _get(lambda: torch.backends.cuda.matmul.allow_tf32),
                              "cudnn": _get(lambda: torch.backends.cudnn.allow_tf32)},
        "bf16_reduced_precision_reduction": _get(
            lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "fp16_reduced_precision_reduction": _get(
            lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
    }
    sec["env"] = {k: os.environ.get(k) for k in ENV_KEYS}
    sec["env"]["CUBLAS_WORKSPACE_CONFIG set by"] = "the user" if _CUBLAS_PRESET is not None else "this script"
    bf16 = {"kdbench_native_bf16": kd_device.native_bf16(dev),
            "kdbench_inference_dtype": str(kd_device.inference_dtype(dev))}
    if dev.type == "cuda":
        bf16["is_bf16_supported(including_emulation=False)"] = _get(
            lambda: torch.cuda.is_bf16_supported(including_emulation=False))
        bf16["is_bf16_supported() (default, emulation counts)"] = _get(torch.cuda.is_bf16_supported)
    sec["bf16"] = bf16
    sec["sdpa_backends_enabled"] = {
        name: _get(getattr(torch.backends.cuda, f"{name}_sdp_enabled"))
        for name in ("flash", "mem_efficient", "math", "cudnn")
        if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}
    sec["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    from kdbench.engine.tuning import step_tuning

    sec["kdbench"] = {"activation_checkpointing_default": trainer.ACTIVATION_CHECKPOINTING,
                      "hidden_chunk_size": losses.HIDDEN_CHUNK_SIZE, "row_block_bytes": losses.ROW_BLOCK_BYTES,
                      "step_tuning (no model)": _get(lambda: step_tuning(dev).to_dict())}
    sec["git_commit"] = _get(git_commit)

    def kernels(out):
        from transformers import GPT2LMHeadModel, LlamaForCausalLM

        from kdbench.data.batching import pack
        from kdbench.modeling import packed_attention, sequence_bounds

        S = ctx.shapes
        for label, cls, cfg in (("micro_llama", LlamaForCausalLM, copy.deepcopy(S.micro)),
                                ("paper_gpt2_student", GPT2LMHeadModel, copy.deepcopy(S.student))):
            if hasattr(cfg, "num_hidden_layers"):
                cfg.num_hidden_layers = 1
            else:
                cfg.n_layer = 1
            model = build_model(cls, cfg, 0, dev).eval()
            ex = make_examples(ctx.pairs, 4, cfg.vocab_size, S.max_prompt, S.max_tokens, seed=0)
            b = pack([e for _, e in ex], [i for i, _ in ex]).to(dev)
            pad = {k: v.to(dev) for k, v in b.padded().items()}
            res = {}
            for precision, auto in (("float32", False), ("bf16_autocast", True)):
                if auto and not kd_device.native_bf16(dev):
                    res[precision] = "bf16 is not native here: kdbench runs float32"
                    continue
                res[precision] = {
                    "packed (position_ids, no mask)": attention_ops(
                        model, {"input_ids": b.input_ids, "position_ids": b.position_ids}, dev, auto),
                    "padded (attention_mask)": attention_ops(
                        model, {"input_ids": pad["input_ids"], "attention_mask": pad["attention_mask"]}, dev, auto)}
                with packed_attention(model, "per_sequence") as mode:
                    res[precision]["packed (per-sequence attention)"] = attention_ops(
                        model, {"input_ids": b.input_ids, "position_ids": b.position_ids,
                                "attention_mask": sequence_bounds(b)}, dev, auto) if mode == "per_sequence" else mode
            out[label] = res
            del model

    item(ctx, sec, "attention_kernels", kernels)
    log(f"environment: {sec['device']} {(sec['gpu'] or {}).get('name', sec['cpu']['model'])}, torch "
        f"{torch.__version__}, precision {sec['precision']['float32_matmul_precision']}")


# ----------------------------------------------------------------------------------------------
# Section 1: correctness on the micro shape
# ----------------------------------------------------------------------------------------------


def recorder(device: torch.device, save_at: int | None = None, save=None):
    """TrainHooks that keep each step's loss and a synchronised clock (step, tokens so far,
    perf_counter), and save the train state after step ``save_at`` with ``save(state, optimizer)``."""
    from kdbench.engine.trainer import TrainHooks

    class Recorder(TrainHooks):
        def __init__(self):
            self.losses: list[float] = []
            self.times: list[tuple[int, int, float]] = []

        def on_log(self, step, point):
            self.losses.append(float(point["loss"]))

        def on_step(self, state, optimizer):
            sync(device)
            self.times.append((state.step, state.tokens, time.perf_counter()))
            if save_at is not None and state.step == save_at:
                save(state, optimizer)

    return Recorder()


def state_equal(a: dict, b: dict) -> tuple[bool, float]:
    worst = 0.0
    same = True
    for k, v in a.items():
        w = b[k]
        if not torch.equal(v, w):
            same = False
            worst = max(worst, float((v.double() - w.double()).abs().max()))
    return same, worst


def section_correctness(ctx: Ctx, sec: dict) -> None:
    from kdbench import losses
    from kdbench.data.batching import pack
    from kdbench.device import autocast_context, inference_dtype
    from kdbench.engine import state as train_state
    from kdbench.engine import teacher_cache
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.check import startup_check
    from kdbench.engine.teacher import CachedTeacher, LiveTeacher, TeacherHead
    from kdbench.engine.trainer import make_optimizer, train
    from kdbench.modeling import final_hidden, head_params, output_head, packed_attention
    from kdbench.registry import get_objective, list_objectives
    from kdbench.suites.spec import TrainSpec

    S, dev, report = ctx.shapes, ctx.device, ctx.report
    same_device = dev.type == "cpu"
    t0 = time.monotonic()
    teacher_cpu, student_cpu, examples = micro_models(ctx)
    dev_student = copy.deepcopy(student_cpu).to(dev)
    dev_teacher = copy.deepcopy(teacher_cpu).to(dev, inference_dtype(dev)).eval().requires_grad_(False)
    batch8 = PackedBatches(examples, S.batch, 0).peek()
    b8 = batch8.to(dev)
    sec["models"] = {"teacher_params": n_params(teacher_cpu), "student_params": n_params(student_cpu),
                     "student_blocks": S.keep, "teacher_dtype_on_device": str(inference_dtype(dev)),
                     "batch_tokens": batch8.n_tokens, "batch_counted": batch8.n_counted, "build_s": time.monotonic() - t0}
    live = LiveTeacher(dev_teacher)
    objectives = [get_objective(spec.name) for spec in list_objectives()]

    def startup(out):
        for obj in objectives:
            name = f"startup_check[{obj.setting}]"
            try:
                res = startup_check(dev_student, obj, b8, live if obj.needs_teacher else None,
                                    chunk_size=losses.HIDDEN_CHUNK_SIZE)
                out[obj.setting] = res.to_dict()
                report.check(f"{name} passes on {dev}", res.passed, value_rel_err=res.value_rel_err,
                             grad_rel_err=max(res.grad_hidden_rel_err, res.grad_head_rel_err),
                             hidden_rel_err=res.hidden_rel_err, head_rel_err=res.head_rel_err)
            except Exception as exc:  # noqa: BLE001 - FastPathMismatch and friends: a failed check
                out[obj.setting] = {"error": f"{type(exc).__name__}: {exc}"}
                report.check(f"{name} passes on {dev}", False, error=f"{type(exc).__name__}: {exc}")
        log(f"start-up check: {sum(1 for v in out.values() if isinstance(v, dict) and v.get('passed'))}/"
            f"{len(objectives)} objectives pass on {dev}")

    item(ctx, sec, "startup_check", startup, need_s=5)

    def cpu_vs_device(out):
        out["note"] = ("the device is the CPU: this compares the CPU with a copy of itself, trivially equal"
                       if same_device else f"CPU float32 vs {dev} float32 with IEEE matmuls (TF32 off), autocast off")
        four = pack(batch8.encoded[:4], batch8.example_ids[:4])
        bc, bd = four, four.to(dev)
        with ieee_float32(dev), torch.no_grad():
            h_c = final_hidden(student_cpu, bc).float()
            h_d = final_hidden(dev_student, bd).float()
            th_c = final_hidden(teacher_cpu, bc).float()   # float32 teacher rows, shared by both sides
        out["hidden_rel_err"] = e = rel(h_d, h_c)
        report.check_le("cpu_vs_device: hidden states (rel.)", e, HIDDEN_RTOL)
        t_head_c = TeacherHead(*head_params(teacher_cpu))
        t_head_d = t_head_c.to(dev)
        th_d = th_c.to(dev)
        w_c = output_head(student_cpu).weight.detach()
        w_d = output_head(dev_student).weight.detach()

        def loss_and_grads(obj, h, w, th, thead, labels):
            hh, ww = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
            with ieee_float32(h.device):
                o = obj.from_hidden(hh, ww, th, thead, labels=labels, chunk_size=losses.HIDDEN_CHUNK_SIZE)
                o.loss.backward()
            return float(o.loss.detach()), hh.grad, ww.grad

        per = out.setdefault("objectives", {})
        for obj in objectives:
            t = obj.needs_teacher
            lc, ghc, gwc = loss_and_grads(obj, h_c, w_c, th_c if t else None, t_head_c if t else None, bc.labels)
            ld, ghd, gwd = loss_and_grads(obj, h_c.to(dev), w_d, th_d if t else None, t_head_d if t else None,
                                          bd.labels)
            r = per[obj.setting] = {"loss_cpu": lc, "loss_device": ld, "loss_rel_err": rel_scalar(ld, lc),
                                    "grad_hidden_rel_err": rel(ghd, ghc), "grad_head_rel_err": rel(gwd, gwc)}
            report.check_le(f"cpu_vs_device[{obj.setting}]: loss (rel.)", r["loss_rel_err"], LOSS_RTOL)
            report.check_le(f"cpu_vs_device[{obj.setting}]: gradients (rel.)",
                            max(r["grad_hidden_rel_err"], r["grad_head_rel_err"]), GRAD_RTOL)
        # the whole student's gradient (body included) for forward KL
        kl = get_objective("kl")
        grads = []
        for model, b, th, thead in ((student_cpu, bc, th_c, t_head_c), (dev_student, bd, th_d, t_head_d)):
            model.zero_grad(set_to_none=True)
            with ieee_float32(b.input_ids.device):
                h = final_hidden(model, b)
                kl.from_hidden(h, output_head(model), th, thead, labels=b.labels).loss.backward()
            grads.append(torch.cat([p.grad.detach().double().cpu().reshape(-1) for p in model.parameters()]))
            model.zero_grad(set_to_none=True)
        out["kl_full_model_grad_rel_err"] = rel(grads[1], grads[0])
        report.check_le("cpu_vs_device[kl]: gradient of every student weight (rel.)",
                        out["kl_full_model_grad_rel_err"], GRAD_RTOL)
        # what training computes on the device: bf16 autocast where native (reported, not asserted)
        with torch.no_grad(), autocast_context(dev):
            h_auto = final_hidden(dev_student, bd)
        with torch.no_grad():
            l_auto = float(kl.from_hidden(h_auto, output_head(dev_student), th_d, t_head_d, labels=bd.labels).loss)
        out["kl_autocast_device_vs_cpu_float32_rel"] = rel_scalar(l_auto, per["kl"]["loss_cpu"])
        out["kl_autocast_note"] = "reported; the review expects <= 2e-2 under bf16 autocast"
        log(f"cpu vs device: hidden {e:.2e}, worst loss "
            f"{max(v['loss_rel_err'] for v in per.values()):.2e}, worst grad "
            f"{max(max(v['grad_hidden_rel_err'], v['grad_head_rel_err']) for v in per.values()):.2e}")

    item(ctx, sec, "cpu_vs_device", cpu_vs_device, need_s=5)

    def packed_vs_sequence(out):
        with ieee_float32(dev), torch.no_grad():
            h_packed = final_hidden(dev_student, b8)
            parts = [final_hidden(dev_student, pack([e], [i]).to(dev))
                     for i, e in zip(batch8.example_ids, batch8.encoded)]
            with packed_attention(dev_student, "per_sequence") as mode:
                h_per_sequence = final_hidden(dev_student, b8)
        h_seq = torch.cat(parts)
        out["rel_err"] = rel(h_packed, h_seq)
        out["max_abs_err"] = float((h_packed - h_seq).abs().max())
        out["sequences"] = len(parts)
        out["per_sequence_attention"] = {"mode": mode, "rel_err": rel(h_per_sequence, h_seq)}
        report.check_le("packed_vs_sequence: hidden states (rel., float32)", out["rel_err"], HIDDEN_RTOL)
        report.check_le("packed_vs_sequence: per-sequence attention vs each sequence alone (rel., float32)",
                        out["per_sequence_attention"]["rel_err"], HIDDEN_RTOL)

    item(ctx, sec, "packed_vs_sequence", packed_vs_sequence)

    def cached_vs_live(out):
        inputs = {"gpu_check": "micro", "shapes": S.name, "examples": len(examples), "device": dev.type}
        key = teacher_cache.cache_key(inputs)
        t = time.monotonic()
        entry, built_s = teacher_cache.get_or_build(key, inputs, dev_teacher, examples, dev, progress=False,
                                                    log=lambda *a, **k: None)
        out.update(build_s=built_s, wall_s_build=time.monotonic() - t, rows=entry.meta["n_rows"],
                   dtype=entry.meta["dtype"], size_mb=entry.size_bytes / 2**20)
        ctx.cache["micro_entry"] = entry
        # the rows read back are the rows written: the build's first pack, recomputed
        first = examples[:teacher_cache.BUILD_BATCH]
        fb = pack([e for _, e in first], [i for i, _ in first]).to(dev)
        with torch.inference_mode():
            again = final_hidden(dev_teacher, fb)
        torch_dtype = torch.bfloat16 if entry.meta["dtype"] == "bfloat16" else torch.float32
        stored = entry.rows([i for i, _ in first], [e for _, e in first])
        out["rows_bitwise_equal"] = bool(torch.equal(again.to(torch_dtype).cpu(), stored))
        report.check("cached_vs_live: rows read back equal the build's, bitwise", out["rows_bitwise_equal"])
        cached = CachedTeacher(entry, dev)
        out["heads_equal"] = bool(torch.equal(cached.head.weight.float().cpu(), live.head.weight.float().cpu()))
        report.check("cached_vs_live: the cached head equals the live teacher's", out["heads_equal"])
        # a training batch: another composition than the build's packs
        with ieee_float32(dev), torch.no_grad():
            tc = head_logits(cached.hidden(b8), cached.head)
            tl = head_logits(live.hidden(b8), live.head)
        out["logits_rel_err"] = rel(tc, tl)
        out["logits_max_abs_err"] = float((tc - tl).abs().max())
        if torch_dtype == torch.float32:  # tests/test_teacher_cache.py's tolerance: assert_close(rtol=atol=1e-5)
            ratio = float(((tc - tl).abs() / (1e-5 + 1e-5 * tl.abs())).max())
            out["assert_close_ratio (<= 1 passes rtol=atol=1e-5)"] = ratio
            report.check_le("cached_vs_live: float32 teacher logits within rtol=atol=1e-5", ratio, 1.0)
        else:
            report.check_le("cached_vs_live: bf16 teacher logits (rel.)", out["logits_rel_err"], CACHED_BF16_RTOL)

    item(ctx, sec, "cached_vs_live_teacher", cached_vs_live)

    def determinism(out):
        entry = ctx.cache.get("micro_entry")
        if entry is None:
            out["skipped"] = "no teacher cache entry (cached_vs_live_teacher failed)"
            report.check("determinism: has a teacher cache entry", False)
            return
        cached = CachedTeacher(entry, dev)
        kl = get_objective("kl")
        spec = TrainSpec(steps=4, batch_size=S.batch, lr=1e-4, warmup_steps=1, log_every=1,
                         max_prompt_tokens=S.max_prompt, max_tokens=S.max_tokens)
        student_cpu.zero_grad(set_to_none=True)

        def run(save_at=None, folder=None, resume=None):
            torch.manual_seed(0)
            model = copy.deepcopy(student_cpu).to(dev)
            batches = PackedBatches(examples, S.batch, 0)
            opt = make_optimizer(model, spec, dev)
            state = None
            if resume is not None:
                state, _ = train_state.load(resume, model, opt, batches)
            rec = recorder(dev, save_at, lambda st, o: train_state.save(folder, st, model, o, batches))
            t = time.perf_counter()
            train(model=model, objective=kl, batches=batches, teacher=cached, spec=spec, device=dev, hooks=rec,
                  state=state, optimizer=opt, progress=False)
            sync(dev)
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return rec.losses, weights, time.perf_counter() - t

        for mode in (False, True):
            label = "deterministic" if mode else "default"
            res = out.setdefault(label, {})
            torch.use_deterministic_algorithms(mode)
            try:
                folder = ctx.tmp / f"state-{label}"
                la, wa, sa = run()
                lb, wb, sb = run(save_at=2, folder=folder)
                lc, wc, sc = run(resume=folder)
                rerun_same, rerun_diff = state_equal(wa, wb)
                resume_same, resume_diff = state_equal(wa, wc)
                res.update(losses_straight=la, losses_rerun=lb, losses_resumed=lc, seconds=[sa, sb, sc],
                           rerun_bitwise=la == lb and rerun_same, rerun_max_weight_diff=rerun_diff,
                           resume_bitwise=la[2:] == lc and resume_same, resume_max_weight_diff=resume_diff)
            except Exception as exc:  # noqa: BLE001 - e.g. an operation without a deterministic kernel
                res["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                torch.use_deterministic_algorithms(False)
            if mode:
                report.check("determinism: with deterministic algorithms, two runs are bitwise equal",
                             res.get("rerun_bitwise", False), error=res.get("error"))
                report.check("determinism: with deterministic algorithms, 2 steps + save/load + 2 steps equal "
                             "4 steps, bitwise", res.get("resume_bitwise", False), error=res.get("error"))
            log(f"determinism ({label}): rerun bitwise {res.get('rerun_bitwise')}, resume bitwise "
                f"{res.get('resume_bitwise')}{' ' + res['error'] if 'error' in res else ''}")

    item(ctx, sec, "determinism_and_resume", determinism)
    ctx.cache.pop("micro", None)
    ctx.cache.pop("micro_entry", None)


# ----------------------------------------------------------------------------------------------
# Section 2: paper-shape training throughput
# ----------------------------------------------------------------------------------------------


def tuned_settings(ctx: Ctx, model, spec, teacher):
    """Arm (c)'s settings: ``kdbench.engine.tuning.step_tuning`` for this device, the paper student,
    the arms' TrainSpec and the cached teacher (what ``train()`` chooses by itself); arms (a) and
    (b) take the CPU's settings (``cpu_tuning``), the engine as it ran before it was tuned per
    device. Returns ``(StepTuning, its record)``."""
    from kdbench.engine.tuning import cpu_tuning, step_tuning

    tuned = step_tuning(ctx.device, model=model, spec=spec, teacher=teacher)
    return tuned, {"source": "kdbench.engine.tuning.step_tuning", **tuned.to_dict(),
                   "cpu_settings (arms a, b)": cpu_tuning().to_dict()}


def load_count_syncs():
    """benchmarks/count_syncs.py as a module (this script may be loaded from anywhere)."""
    import importlib.util

    name = "kdbench_count_syncs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "count_syncs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def stub_tokenizer(vocab: int):
    """A tokenizer for TRL's collator without any file: word ``t<i>`` is token ``i``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t0",
                                   eos_token=f"t{vocab - 1}", model_max_length=1024)


def window(times: list, warmup: int) -> dict:
    """tokens/s and s/step over the steps after ``warmup`` (``times``: (step, tokens, clock))."""
    if len(times) <= warmup or warmup < 1:
        return {"tokens_per_s": None, "s_per_step": None, "timed_steps": 0}
    s0, k0, c0 = times[warmup - 1]
    s1, k1, c1 = times[-1]
    dt = c1 - c0
    return {"tokens_per_s": (k1 - k0) / dt if dt > 0 else None, "s_per_step": dt / (s1 - s0),
            "timed_steps": s1 - s0, "timed_tokens": k1 - k0}


def section_training(ctx: Ctx, sec: dict) -> None:
    from kdbench.data.batching import collate, pack
    from kdbench.device import autocast_context, native_bf16
    from kdbench.engine import teacher_cache
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.state import lr_at
    from kdbench.engine.teacher import CachedTeacher, LiveTeacher
    from kdbench.engine.trainer import train
    from kdbench.engine.tuning import cpu_tuning
    from kdbench.modeling import final_hidden, packed_attention
    from kdbench.registry import get_objective
    from kdbench.suites.spec import TrainSpec

    S, dev, report = ctx.shapes, ctx.device, ctx.report
    t0 = time.monotonic()
    teacher, template, examples = paper_models(ctx)
    n_steps = S.warmup + S.timed
    src = PackedBatches(examples, S.batch, 0)
    first = [next(src) for _ in range(n_steps)]
    sec["setup"] = {"teacher_params": n_params(teacher), "student_params": n_params(template),
                    "teacher_dtype": str(next(teacher.parameters()).dtype), "vocab": S.student.vocab_size,
                    "batch": S.batch, "warmup_steps": S.warmup, "timed_steps": S.timed,
                    "mean_tokens_per_step": sum(b.n_tokens for b in first) / n_steps,
                    "mean_counted_per_step": sum(b.n_counted for b in first) / n_steps,
                    "dropout": "off in both configs (so that the arms' losses compare)",
                    "build_s": time.monotonic() - t0}
    spec = TrainSpec(steps=n_steps, batch_size=S.batch, lr=1e-4, warmup_steps=1, log_every=1,
                     max_prompt_tokens=S.max_prompt, max_tokens=S.max_tokens)
    kl = get_objective("kl")

    def new_student():
        return copy.deepcopy(template).train()

    def packed(out):
        model = new_student().eval()
        b = first[0].to(dev)
        with ieee_float32(dev), torch.no_grad():
            hp = final_hidden(model, b)
            hs = torch.cat([final_hidden(model, pack([e], [i]).to(dev)) for i, e in zip(b.example_ids, b.encoded)])
            with packed_attention(model, "per_sequence") as mode:
                hq = final_hidden(model, b)
        out["rel_err"] = rel(hp, hs)
        out["per_sequence_attention"] = {"mode": mode, "rel_err": rel(hq, hs)}
        report.check_le("training: GPT-2 packed vs per-sequence hidden states (rel., float32)", out["rel_err"],
                        HIDDEN_RTOL)
        report.check_le("training: GPT-2 per-sequence attention vs each sequence alone (rel., float32)",
                        out["per_sequence_attention"]["rel_err"], HIDDEN_RTOL)

    item(ctx, sec, "gpt2_packed_vs_sequence", packed)

    def build_cache(out):
        inputs = {"gpu_check": "paper", "shapes": S.name, "examples": len(examples), "device": dev.type}
        entry, built_s = teacher_cache.get_or_build(teacher_cache.cache_key(inputs), inputs, teacher, examples, dev,
                                                    progress=False, log=lambda *a, **k: None)
        out.update(build_s=built_s, rows=entry.meta["n_rows"], dtype=entry.meta["dtype"],
                   size_mb=entry.size_bytes / 2**20)
        return entry

    entry = item(ctx, sec, "teacher_cache_build", build_cache)
    arms = sec.setdefault("arms", {})
    cpu = cpu_tuning()
    estimate = [10.0]  # seconds an arm takes, updated as arms run

    def kdbench_arm(name, objective, source, tuning):
        def run(out):
            out["settings"] = {"objective": objective.setting, "teacher": source.kind, **tuning.to_dict()}
            reset_peaks(dev)
            torch.manual_seed(0)
            model = new_student()
            rec = recorder(dev)
            t = time.perf_counter()
            res = train(model=model, objective=objective, batches=PackedBatches(examples, S.batch, 0), teacher=source,
                        spec=spec, device=dev, hooks=rec, tuning=tuning, progress=False)
            out["settings_used"] = res.step_tuning
            sync(dev)
            estimate[0] = time.perf_counter() - t
            out.update(window(rec.times, S.warmup))
            out.update(peaks(dev))
            out["first_losses"] = rec.losses[:3]
            out["all_losses_finite"] = all(math.isfinite(x) for x in rec.losses)
            report.check(f"training[{name}]: every loss finite", out["all_losses_finite"])
            log(f"arm {name}: {out['tokens_per_s'] or 0:.0f} tok/s, {out['s_per_step'] or 0:.3f} s/step, "
                f"first loss {rec.losses[0]:.6g}")
            del model
        return run

    tuned = cpu
    if entry is not None:
        cached = CachedTeacher(entry, dev)
        if dev.type == "cuda":  # kdbench does not hold the teacher while a cached run trains
            teacher.to("cpu")
            free_memory(dev)
        # chosen as train() chooses, with the memory this arm will have (the teacher off the device)
        tuned, sec["tuned_settings"] = tuned_settings(ctx, new_student().to(dev), spec, cached)
        free_memory(dev)
        item(ctx, arms, "a_shipped", kdbench_arm("a_shipped", kl, cached, cpu))
        for name, arm_tuning in (("b_no_checkpointing", dataclasses.replace(cpu, activation_checkpointing=False)),
                                 ("c_tuned", tuned)):
            item(ctx, arms, name, kdbench_arm(name, kl, cached, arm_tuning), need_s=estimate[0] * 1.5)
        if dev.type == "cuda":
            teacher.to(dev)
    live = LiveTeacher(teacher)
    if entry is None:
        tuned, sec["tuned_settings"] = tuned_settings(ctx, new_student().to(dev), spec, live)
    item(ctx, arms, "d_live_teacher", kdbench_arm("d_live_teacher", kl, live, tuned), need_s=estimate[0] * 2)

    def hand_loop(out):
        bf16 = native_bf16(dev)
        out["settings"] = {"objective": "forward KL, float32 log-softmax over full logits", "teacher": "live",
                           "batch": "right-padded [B, T]", "precision": "bf16 autocast" if bf16 else "float32 "
                           "(bf16 not native here)", "optimizer": "AdamW fused"}
        reset_peaks(dev)
        torch.manual_seed(0)
        model = new_student()
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=0.0)
        src = PackedBatches(examples, S.batch, 0)
        lossv, times, tokens = [], [], 0
        for step in range(n_steps):
            b = next(src)
            p = {k: v.to(dev) for k, v in collate(b.encoded, 0).items()}
            for g in opt.param_groups:
                g["lr"] = lr_at(step, spec)
            with torch.no_grad():
                t_logits = teacher(input_ids=p["input_ids"], attention_mask=p["attention_mask"], use_cache=False).logits
            with autocast_context(dev, bf16):
                s_logits = model(input_ids=p["input_ids"], attention_mask=p["attention_mask"], use_cache=False).logits
            m = p["loss_mask"]
            s, t = s_logits[m].float(), t_logits[m].float()
            lt = t.log_softmax(-1)
            loss = (lt.exp() * (lt - s.log_softmax(-1))).sum(-1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lossv.append(float(loss.detach()))
            tokens += b.n_tokens
            sync(dev)
            times.append((step + 1, tokens, time.perf_counter()))
            del t_logits, s_logits, s, t, lt, loss
        out.update(window(times, S.warmup))
        out.update(peaks(dev))
        out["first_losses"] = lossv[:3]
        out["all_losses_finite"] = all(math.isfinite(x) for x in lossv)
        report.check("training[e_hand_loop]: every loss finite", out["all_losses_finite"])
        log(f"arm e_hand_loop: {out['tokens_per_s'] or 0:.0f} tok/s, first loss {lossv[0]:.6g}")
        del model, opt

    item(ctx, arms, "e_hand_loop", hand_loop, need_s=estimate[0] * 1.5)

    def trl_arm(out):
        try:
            try:
                from trl.experimental.gkd import GKDConfig, GKDTrainer
                from trl.experimental.utils import DataCollatorForChatML
            except ImportError:
                from trl import GKDConfig, GKDTrainer
                from trl.trainer.utils import DataCollatorForChatML
            from datasets import Dataset
        except ImportError as exc:
            out["skipped"] = f"trl not importable here ({exc}); pip install trl==1.16.0 to add this arm"
            log(f"arm f_trl: skipped ({out['skipped']})")
            return
        from transformers import TrainerCallback

        bf16 = native_bf16(dev)
        tok = stub_tokenizer(S.student.vocab_size)
        order = PackedBatches(examples, S.batch, 0)
        rows = [{"prompt": tok.decode(e.ids[:e.n_prompt]), "input_ids": e.ids, "attention_mask": [1] * len(e.ids),
                 "completion_mask": [0] * e.n_prompt + [1] * (len(e.ids) - e.n_prompt)}
                for _ in range(n_steps) for e in next(order).encoded]
        base = DataCollatorForChatML(tokenizer=tok, max_length=S.max_tokens)
        per_batch: list[int] = []

        def collator(examples_):   # counts each batch's real tokens (the Trainer shuffles the rows)
            batch = base(examples_)
            per_batch.append(int(batch["attention_mask"].sum()))
            return batch

        times, lossv = [], []

        class Clock_(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                sync(dev)
                k = state.global_step
                times.append((k, sum(per_batch[:k]), time.perf_counter()))

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    lossv.append(float(logs["loss"]))

        reset_peaks(dev)
        torch.manual_seed(0)
        cfg = GKDConfig(output_dir=str(ctx.tmp / "trl"), per_device_train_batch_size=S.batch, max_steps=n_steps,
                        learning_rate=spec.lr, lmbda=0.0, beta=0.0, temperature=1.0, bf16=bf16,
                        use_cpu=dev.type == "cpu", logging_steps=1, save_strategy="no", report_to=[],
                        dataloader_drop_last=True, remove_unused_columns=False, seed=0, data_seed=0,
                        max_length=S.max_tokens)
        out["settings"] = {"trl": _version("trl"), "lmbda": 0.0, "beta": 0.0, "bf16": bf16,
                           "gradient_checkpointing": getattr(cfg, "gradient_checkpointing", None),
                           "teacher": "live", "tokenizer": "a word-level stub (t0 ... tV-1): rows come tokenised"}
        trainer = GKDTrainer(model=new_student(), teacher_model=teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, data_collator=collator, callbacks=[Clock_()])
        trainer.train()
        out.update(window(times, S.warmup))
        out.update(peaks(dev))
        out["first_losses"] = lossv[:3]
        out["all_losses_finite"] = all(math.isfinite(x) for x in lossv)
        report.check("training[f_trl]: every loss finite", out["all_losses_finite"])
        log(f"arm f_trl: {out['tokens_per_s'] or 0:.0f} tok/s")
        del trainer

    item(ctx, arms, "f_trl", trl_arm, need_s=estimate[0] * 2)

    if entry is not None:  # CSD as well, where time is left: shipped and tuned (reported only)
        csd = get_objective("csd")
        extra = sec.setdefault("csd_arms", {})
        for name, arm_tuning in (("a_shipped", cpu), ("c_tuned", tuned)):
            item(ctx, extra, name, kdbench_arm(f"csd_{name}", csd, CachedTeacher(entry, dev), arm_tuning),
                 need_s=estimate[0] * 1.5)
        # what per-sequence attention adds to the tuned loss settings: (c) with the dense mask (reported)
        item(ctx, extra, "kl_c_tuned_dense_attention",
             kdbench_arm("kl_c_tuned_dense_attention", kl, CachedTeacher(entry, dev),
                         dataclasses.replace(tuned, packed_attention="dense")), need_s=estimate[0] * 1.5)

    def host_syncs(out):
        """Host synchronisations per step of ``train()`` (benchmarks/count_syncs.py: torch's sync
        debug mode on CUDA, the tensor conversions counted on a CPU), CPU settings vs tuned."""
        counter = load_count_syncs()
        for label, arm_tuning in (("cpu_settings", cpu), ("tuned", None)):
            for kind, name in (("gpt2", "kl"), ("llama", "csd")):
                per_step, sites = counter.count(kind, name, dev, 3, arm_tuning)
                out[f"{label}/{kind}/{name}"] = {"per_step": per_step, "sites": sites}
        log("host syncs per step: " + ", ".join(f"{k} {v['per_step']:.2f}" for k, v in out.items()))

    item(ctx, sec, "host_syncs_per_step", host_syncs, need_s=5)

    # assertions and ratios
    a, b, c = (arms.get(k, {}) for k in ("a_shipped", "b_no_checkpointing", "c_tuned"))
    e, f = arms.get("e_hand_loop", {}), arms.get("f_trl", {})
    fl = {k: v["first_losses"][0] for k, v in arms.items() if v.get("first_losses")}
    sec["first_loss"] = fl
    if "a_shipped" in fl and "e_hand_loop" in fl:
        report.check_le("training: kdbench's first-step KL equals the hand loop's (rel.)",
                        rel_scalar(fl["a_shipped"], fl["e_hand_loop"]), HAND_LOOP_KL_RTOL,
                        kdbench=fl["a_shipped"], hand_loop=fl["e_hand_loop"])
    for other in ("b_no_checkpointing", "c_tuned"):
        if "a_shipped" in fl and other in fl:
            report.check_le(f"training: arm {other}'s first loss equals a_shipped's (rel.)",
                            rel_scalar(fl[other], fl["a_shipped"]), ARMS_FIRST_LOSS_RTOL)
    ratios = {}
    for label, num, den in (("c_over_e", c, e), ("c_over_f", c, f), ("a_over_e", a, e), ("b_over_a", b, a),
                            ("d_over_e", arms.get("d_live_teacher", {}), e)):
        if num.get("tokens_per_s") and den.get("tokens_per_s"):
            ratios[label] = num["tokens_per_s"] / den["tokens_per_s"]
    sec["ratios"] = ratios
    sec["targets (H100, reported, not asserted)"] = TARGETS
    for label, target in TARGETS.items():
        shown = f"{ratios[label]:.2f}x" if label in ratios else "n/a (an arm is missing or was skipped)"
        log(f"ratio {label.replace('_over_', '/')}: {shown} (H100 target >= {target:g}x)")


# ----------------------------------------------------------------------------------------------
# Section 3: generation
# ----------------------------------------------------------------------------------------------


def cache_bytes(cache) -> int | None:
    """Bytes held by a transformers cache's key and value tensors."""
    total, seen = 0, False
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                seen = True
    if not seen:
        for name in ("key_cache", "value_cache"):
            for t in getattr(cache, name, None) or []:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
                    seen = True
    return total if seen else None


def section_generation(ctx: Ctx, sec: dict) -> None:
    from kdbench.device import inference_dtype
    from kdbench.evaluation.sampling import decode_from, draw_uniforms, prefill

    S, dev = ctx.shapes, ctx.device
    teacher, template, examples = paper_models(ctx)
    if next(teacher.parameters()).device != dev:
        teacher.to(dev)
    dtype = inference_dtype(dev)
    models = {"student": copy.deepcopy(template).to(dtype).eval().requires_grad_(False), "teacher": teacher}
    prompts_all = [e.ids[:e.n_prompt] for _, e in examples]
    n_new = S.gen_new
    sec["settings"] = {"new_tokens": n_new, "batch_sizes": list(S.gen_batches), "dtype": str(dtype),
                       "sampling": "temperature 1, no top-k / top-p; no end-of-turn (every row runs to the end, "
                                   "the random-weight worst case)",
                       "kdbench": "kdbench.evaluation.sampling.prefill + decode_from (keyed uniforms)",
                       "hf": "model.generate(do_sample=True, min_new_tokens = max_new_tokens)"}

    def kd(model, prompts, n):
        keys = [f"p{i}" for i in range(len(prompts))]
        u = draw_uniforms(0, keys, n)
        sync(dev)
        t0 = time.perf_counter()
        prefix = prefill(model, prompts, pad_id=0, device=dev)
        sync(dev)
        t1 = time.perf_counter()
        kv = cache_bytes(prefix.cache)
        positions = int(prefix.mask.numel())
        real = int(prefix.mask.sum())
        out = decode_from(model, prefix, max_new_tokens=n, eos_id=-1, uniforms=u)
        sync(dev)
        t2 = time.perf_counter()
        new = sum(len(r) for r in out)
        return {"prefill_s": t1 - t0, "total_s": t2 - t0, "new_tokens": new, "tokens_per_s": new / (t2 - t0),
                "decode_tokens_per_s": new / (t2 - t1), "kv_bytes_after_prefill": kv,
                "kv_bytes_per_position": None if kv is None else kv / positions,
                "kv_bytes_per_real_token": None if kv is None else kv / real,
                "padded_positions": positions, "real_prompt_tokens": real}

    def hf(model, prompts, n):
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        eos = model.config.eos_token_id
        sync(dev)
        t0 = time.perf_counter()
        res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                             top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0, eos_token_id=eos,
                             return_dict_in_generate=True)
        sync(dev)
        t1 = time.perf_counter()
        seq = res.sequences if hasattr(res, "sequences") else res
        new = (seq.shape[1] - width) * seq.shape[0]
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        kv = cache_bytes(cache) if cache is not None else None
        return {"total_s": t1 - t0, "new_tokens": new, "tokens_per_s": new / (t1 - t0), "kv_bytes_at_end": kv,
                "kv_bytes_per_position": None if kv is None else kv / (seq.shape[0] * (seq.shape[1] - 1))}

    kv_per_token = {}
    for name, model in models.items():
        cfg = model.config
        per = 2 * cfg.n_layer * cfg.n_embd * torch.finfo(dtype).bits // 8  # keys + values, every layer
        kv_per_token[name] = {"theoretical": per}

        def warm(out, model=model):
            with torch.no_grad():
                kd(model, prompts_all[:2], 2)
                hf(model, prompts_all[:2], 2)

        item(ctx, sec, f"{name}_warmup", warm)
        for bs in S.gen_batches:
            prompts = [prompts_all[i % len(prompts_all)] for i in range(bs)]

            def run(out, model=model, prompts=prompts, name=name, bs=bs):
                reset_peaks(dev)
                out["kdbench"] = kd(model, prompts, n_new)
                out["kdbench"].update(peaks(dev))
                reset_peaks(dev)
                out["hf_generate"] = hf(model, prompts, n_new)
                out["hf_generate"].update(peaks(dev))
                out["kdbench_over_hf"] = out["kdbench"]["tokens_per_s"] / out["hf_generate"]["tokens_per_s"]
                if out["kdbench"]["kv_bytes_per_position"]:
                    kv_per_token[name]["measured"] = out["kdbench"]["kv_bytes_per_position"]
                log(f"generation {name} batch {bs}: kdbench {out['kdbench']['tokens_per_s']:.0f} tok/s, HF generate "
                    f"{out['hf_generate']['tokens_per_s']:.0f} tok/s, KV "
                    f"{out['kdbench']['kv_bytes_per_position'] or 0:.0f} B/position")

            item(ctx, sec, f"{name}_batch{bs}", run, need_s=2)
    sec["kv_bytes_per_token"] = kv_per_token
    proj = {}
    p = PROJECTION
    for name, kv in kv_per_token.items():
        per = kv.get("measured") or kv["theoretical"]
        proj[name] = {suite: {"prompts": n, "all_batches_resident_gib": n * p["tokens"] * per / 2**30,
                              "one_batch_resident_gib": p["batch"] * p["tokens"] * per / 2**30}
                      for suite, n in (("sni", p["sni"]), ("unni", p["unni"]))}
    sec["projected_resident_kv"] = {"assumes": f"{p['tokens']} tokens per prompt, {p['batch']} prompts per batch, "
                                               f"the paper shape's KV bytes per token ({dtype})", **proj}
    for name, v in proj.items():
        log(f"projected resident KV, {name}: S-NI all batches {v['sni']['all_batches_resident_gib']:.1f} GiB, UnNI "
            f"{v['unni']['all_batches_resident_gib']:.1f} GiB; one batch {v['sni']['one_batch_resident_gib']:.2f} GiB")
    del models


# ----------------------------------------------------------------------------------------------
# Section 4: head-product precision
# ----------------------------------------------------------------------------------------------


def section_head_precision(ctx: Ctx, sec: dict) -> None:
    dev = ctx.device
    n, v, d = ctx.shapes.head
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, device=dev, generator=g)                        # final hidden states, unit scale
    w = torch.randn(v, d, device=dev, generator=g) * (3.0 / math.sqrt(d))  # logits with std ~3, a trained LM's
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    with cuda_matmul("ieee"):
        ref_logits = h.double() @ w.double().t()
        p = ref_logits.softmax(-1)
        grad = (p - torch.nn.functional.one_hot(labels, v).double()) / n  # a KL/CE-like logits gradient
        refs = {"logits": ref_logits, "grad_hidden": grad @ w.double(), "grad_head": grad.t() @ h.double()}
    grad32 = grad.float()
    ref_lsm = ref_logits.log_softmax(-1)
    sec["shape"] = {"N": n, "V": v, "d": d, "scale": "h ~ N(0, 1), W ~ N(0, (3/sqrt(d))^2): logits of std ~3",
                    "products": "logits = h W^T [N, V]; grad_hidden = G W [N, d]; grad_head = G^T h [V, d]"}
    modes = [("ieee_float32", "ieee", None), ("tf32", "tf32", None), ("bf16", "ieee", torch.bfloat16)]
    res = sec.setdefault("modes", {})
    for label, mm, cast in modes:
        if label == "tf32" and dev.type != "cuda":
            res[label] = {"skipped": "TF32 is a CUDA matmul mode; this run is on the CPU"}
            continue

        def run(out, mm=mm, cast=cast):
            def prods():
                hh, ww, gg = ((x.to(cast) for x in (h, w, grad32)) if cast is not None else (h, w, grad32))
                return {"logits": hh @ ww.t(), "grad_hidden": gg @ ww, "grad_head": gg.t() @ hh}

            with cuda_matmul(mm):
                prods()   # warm-up
                reps = 5 if dev.type == "cuda" else 1
                got = prods()
                for name in refs:
                    hh, ww, gg = ((x.to(cast) for x in (h, w, grad32)) if cast is not None else (h, w, grad32))
                    fn = {"logits": lambda: hh @ ww.t(), "grad_hidden": lambda: gg @ ww,
                          "grad_head": lambda: gg.t() @ hh}[name]
                    err = (got[name].double() - refs[name]).abs().max()
                    scale = refs[name].abs().max()
                    out[name] = {"ms": timed(fn, dev, reps) * 1e3, "max_abs_err": float(err),
                                 "max_abs_ref": float(scale), "max_rel_err": float(err / scale)}
                out["logits"]["log_softmax_max_abs_err"] = float(
                    (got["logits"].float().log_softmax(-1).double() - ref_lsm).abs().max())
            log(f"head {mm if cast is None else 'bf16'}: logits {out['logits']['ms']:.2f} ms, max rel err "
                f"{out['logits']['max_rel_err']:.1e}, log-softmax max abs err {out['logits']['log_softmax_max_abs_err']:.1e}")

        item(ctx, res, label, run)


# ----------------------------------------------------------------------------------------------
# Section 5: the distributed paths (torch.distributed.run, one process)
# ----------------------------------------------------------------------------------------------


DIST_SCRIPT = Path(__file__).resolve().parent / "dist_check.py"
DIST_MARGIN_S = {"tiny": 5, "full": 10}          # the launcher must be done this long before the time box
DIST_STOP_GRACE_S = 15                            # SIGTERM to the launcher (it stops its worker), then SIGKILL
OUTPUT_TAIL_CHARS = 8000


def distributed_unavailable(device: torch.device) -> str | None:
    """Why section 5 cannot run here (None: it can): no torch.distributed, or no backend for the device."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if device.type == "cuda":
        return None if dist.is_nccl_available() else "this torch has no NCCL backend"
    if device.type == "cpu":
        return None if dist.is_gloo_available() else "this torch has no gloo backend"
    return f"device {device.type}: dist_check runs on CUDA (NCCL) or the CPU (gloo)"


def _tail(path: Path, chars: int = OUTPUT_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if len(text) <= chars else "...\n" + text[-chars:]


def _ours(pid) -> bool:
    """Whether ``pid`` is a live dist_check.py process (the launcher's worker this section started)."""
    try:
        return DIST_SCRIPT.name in Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, TypeError, ValueError):
        return False


def _stop_launcher(proc, report_path: Path) -> None:
    """Stop the launcher this section started and its worker: SIGTERM to the launcher's process
    group (torch's agent then stops the worker, which runs in a session of its own), SIGKILL after
    a grace period, and the worker by the pid it wrote into its report if it is still alive."""
    for sig, grace in ((signal.SIGTERM, DIST_STOP_GRACE_S), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    try:
        pid = json.loads(report_path.read_text())["header"]["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if _ours(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def section_distributed(ctx: Ctx, sec: dict) -> None:
    """``python -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/dist_check.py``
    (time-boxed, its output kept): the trainer plain, as DDP(StudentBody) and FSDP2-sharded on the
    paper pair (tiny: the tiny pair), NCCL on CUDA, gloo on the CPU; its report folded in here."""
    dev, report = ctx.device, ctx.report
    why = distributed_unavailable(dev)
    if why is not None:
        sec["skipped"] = why
        log(f"distributed: skipped ({why})")
        return
    ctx.cache.pop("paper", None)   # the child builds its own pair: the GPU's memory is its
    free_memory(dev)
    margin = DIST_MARGIN_S["tiny" if ctx.tiny else "full"]
    wait_s = max(1.0, ctx.clock.left() - margin)
    out, logf = ctx.tmp / "dist_check.json", ctx.tmp / "dist_check.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(DIST_SCRIPT),
           "--out", str(out), "--device", dev.type, "--budget-s", f"{max(1.0, wait_s - 2 * margin):.0f}",
           *(["--tiny"] if ctx.tiny else [])]
    env = dict(os.environ)
    if ctx.tiny:
        env["OMP_NUM_THREADS"] = "1"
    if dev.type == "cuda" and dev.index:   # the launcher's worker takes cuda:<LOCAL_RANK>: make this GPU its 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[dev.index]
    if dev.type == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    launch = sec["launch"] = {"command": " ".join(["python", *cmd[1:]]).replace(str(ROOT) + "/", ""),
                              "timeout_s": round(wait_s, 1), "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")}
    log(f"distributed: {launch['command']} (stopped after {wait_s:.0f} s)")
    t0 = time.monotonic()
    with open(logf, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:   # a timeout, the section's time box, Ctrl-C: the launcher and its worker go too
            if proc.poll() is None:
                alarm = signal.signal(signal.SIGALRM, signal.SIG_IGN)   # no time box inside the clean-up
                try:
                    _stop_launcher(proc, out)
                finally:
                    signal.signal(signal.SIGALRM, alarm)
    if ctx.clock.left() <= 0 and not ctx.clock.expired:   # the time box ran out while the launcher was stopped
        ctx.clock.expired = True
        raise TimeBox(f"section 5_distributed: time box of {ctx.clock.budget_s:.0f} s ran out")
    launch.update(rc=rc, wall_s=round(time.monotonic() - t0, 2), output_tail=_tail(logf))
    try:
        child = json.loads(out.read_text())
    except (OSError, ValueError):
        child = None
    if child is not None:
        csec = child.get("sections", {}).get("distributed", {})
        sec.update({k: v for k, v in csec.items() if k not in ("status", "wall_s")})
        launch.update(worker_status=csec.get("status"), worker_wall_s=csec.get("wall_s"),
                      worker_exit_code=child.get("exit_code"), worker_finished=child.get("finished", False))
        for c in child.get("checks", []):   # the worker's assertions are this run's
            report.check(c["name"], c["ok"], **{k: v for k, v in c.items() if k not in ("name", "ok")})
        for what in child.get("incomplete", []):
            report.incomplete(f"5_distributed: {what}")
    if rc is None:
        report.incomplete(f"5_distributed: the launcher ran past {wait_s:.0f} s and was stopped")
    elif child is None or not child.get("finished"):
        report.check("distributed: dist_check wrote its report", False, rc=rc, output_tail=launch["output_tail"][-1500:])
    elif rc != 0 and child.get("exit_code") == 0:
        report.check("distributed: the launcher exits 0", False, rc=rc, output_tail=launch["output_tail"][-1500:])
    ran = {k: v for k, v in sec.get("arms", {}).items() if isinstance(v, dict) and v.get("tokens_per_s")}
    diffs = {k: v["max_rel_diff"] for k, v in sec.get("agreement", {}).items() if isinstance(v, dict)}
    log("distributed: " + (", ".join(f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in ran.items()) or "no arm ran")
        + ("; losses vs " + sec["agreement"]["reference"] + ": " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
           if diffs else ""))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


RUNNERS = {0: section_environment, 1: section_correctness, 2: section_training, 3: section_generation,
           4: section_head_precision, 5: section_distributed}


def parse_sections(values: list[str]) -> list[int]:
    out: list[int] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            k = int(part) if part.isdigit() else next((i for i, n in SECTIONS.items() if n == part), None)
            if k is None or k not in SECTIONS:
                raise SystemExit(f"gpu_check: unknown section {part!r}; choose from "
                                 + ", ".join(f"{i} ({n})" for i, n in SECTIONS.items()))
            if k not in out:
                out.append(k)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file written (default: gpu_check.json)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu; "
                                                    "--tiny: cpu)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: every section on the CPU in "
                                                        "under a minute (the test suite runs it)")
    ap.add_argument("--sections", nargs="+", default=[",".join(str(k) for k in SECTIONS)],
                    help="sections to run, by number or name: 0 environment, 1 correctness, 2 training, "
                         "3 generation, 4 head_precision, 5 distributed (default: all)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every section's time box (default 1.0)")
    args = ap.parse_args(argv)
    sections = parse_sections(args.sections)
    from kdbench.device import resolve_device
    from kdbench.errors import UserError

    name = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    try:
        device = resolve_device(name)
    except UserError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.tiny:
        torch.set_num_threads(1)
    budgets = {k: v * args.budget_scale for k, v in (TINY_BUDGET_S if args.tiny else BUDGET_S).items()}
    tmp = Path(tempfile.mkdtemp(prefix="kdbench-gpu-check-"))
    os.environ["KDBENCH_CACHE"] = str(tmp / "cache")   # never the user's cache
    header = {"script": "benchmarks/gpu_check.py", "argv": sys.argv if argv is None else ["gpu_check.py", *argv],
              "device": str(device), "tiny": args.tiny, "sections": [f"{k}_{SECTIONS[k]}" for k in sections],
              "budgets_s": {f"{k}_{SECTIONS[k]}": budgets[k] for k in sections},
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
              "data": str(DOLLY_LENGTHS.relative_to(ROOT)), "kdbench_cache": "a temporary folder, removed at the end",
              "exit_codes": "0 every assertion held; 1 an assertion failed or a section raised; "
                            "3 none failed but a time box cut something short"}
    report = Report(args.out, header)
    started = time.monotonic()
    ctx = Ctx(args=args, device=device, tiny=args.tiny, shapes=make_shapes(args.tiny), report=report, tmp=tmp,
              pairs=load_pairs(8 if args.tiny else 1))
    try:
        for k in sections:
            run_section(ctx, k, RUNNERS[k], budgets[k])
    finally:
        ctx.cache.clear()
        free_memory(device)
        shutil.rmtree(tmp, ignore_errors=True)
        summary = report.data["summary"]
        summary["wall_s"] = round(time.monotonic() - started, 1)
        summary["checks"] = len(report.data["checks"])
        summary["failed"] = len(report.data["failed_assertions"])
        tr = report.data["sections"].get("2_training", {})
        summary["tokens_per_s"] = {k: v.get("tokens_per_s") for k, v in tr.get("arms", {}).items()}
        summary["peak_gpu_allocated_mb"] = {k: v.get("gpu_max_allocated_mb") for k, v in tr.get("arms", {}).items()
                                            if "gpu_max_allocated_mb" in v}
        summary["ratios"] = tr.get("ratios", {})
        gen = report.data["sections"].get("3_generation", {})
        summary["decode_tokens_per_s"] = {k: {"kdbench": v["kdbench"]["tokens_per_s"],
                                              "hf_generate": v["hf_generate"]["tokens_per_s"]}
                                          for k, v in gen.items() if isinstance(v, dict) and "kdbench" in v
                                          and "hf_generate" in v}
        dist_sec = report.data["sections"].get("5_distributed", {})
        if dist_sec.get("arms") or dist_sec.get("skipped"):
            summary["distributed"] = {
                "skipped": dist_sec.get("skipped"),
                "backend": dist_sec.get("environment", {}).get("backend"),
                "tokens_per_s": {k: v.get("tokens_per_s") for k, v in dist_sec.get("arms", {}).items()},
                "peak_gpu_allocated_mb": {k: v.get("gpu_max_allocated_mb") for k, v in dist_sec.get("arms", {}).items()
                                          if "gpu_max_allocated_mb" in v},
                "loss_max_rel_diff": {k: v["max_rel_diff"] for k, v in dist_sec.get("agreement", {}).items()
                                      if isinstance(v, dict)}}
        log(f"{summary['checks']} checks, {summary['failed']} failed, {summary['wall_s']} s")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
