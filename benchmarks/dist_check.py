#!/usr/bin/env python
"""The distributed paths on one device: kdbench's trainer through torch.distributed (NCCL on CUDA,
gloo on the CPU) on the paper-shaped pair, three ways, in one process (issue 29, target 6).

benchmarks/gpu_check.py's section 5 (distributed) starts it through torch's launcher and folds
its JSON into its own; it runs alone as well, from the repository root::

    python -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/dist_check.py --out dist.json
    python -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/dist_check.py --tiny --out tiny.json
    python benchmarks/dist_check.py --tiny --out tiny.json     # no launcher: a one-process group of its own

The process joins the process group (``nccl`` on ``cuda:<LOCAL_RANK>`` after
``torch.cuda.set_device``, ``gloo`` on the CPU; ``--tiny`` defaults to the CPU), builds the pair
gpu_check's section 2 builds (``make_shapes``: GPT-2 XL's shape → GPT-2 base from configs with
seeded random weights, dropout off, the teacher in its inference dtype and live; Dolly's lengths
from benchmarks/data/dolly_lengths.json; ``--tiny``: gpu_check's tiny shapes) and trains the same
steps (forward KL, section 2's TrainSpec, one step tuning for every arm: what
``kdbench.engine.tuning.step_tuning`` chooses for the plain student) with
``kdbench.engine.trainer.train`` three ways, each from the same seeded weights, after an
unrecorded pass of the plain model over the same steps (the process's first calls and each
step's shapes, oneDNN's per-shape primitives on the CPU, cuBLAS's choices on CUDA: without it
the first arm alone pays them, 2.3x slower on the tiny CPU run whichever arm goes first):

a_plain    the LM itself, as a one-process run trains it (world 1 only: on more ranks a bare
           model would not average its gradients, so the arm is skipped and b_ddp is the reference)
b_ddp      ``DDP(StudentBody(lm))`` (kdbench/modeling.py), as ``kdbench run --num-processes N``
c_fsdp2    ``shard_student(lm, device)`` (kdbench/engine/fsdp.py: each decoder block and the root
           ``fully_shard``-ed, the loss made inside the forward), as ``--fsdp``

Per arm: tokens/s and s/step after the warm-up steps (synchronised clock), the trainer's own
tokens/s, peak GPU memory (``torch.cuda.max_memory_allocated``, reset between arms; what was
allocated when the arm started, the teacher and the template, beside it) on CUDA and the host
RSS peak during the arm (sampled every 5 ms; its RSS at the start beside it) everywhere, the
losses (every step), the step's split (``parallel``). Asserted: every loss finite; the backend
is NCCL on CUDA, gloo elsewhere; every FSDP parameter is a DTensor; and b_ddp's and c_fsdp2's
per-step losses equal a_plain's: max relative difference ≤ 1e-3 where the arms run under bf16
autocast (native bf16), ≤ 1e-5 in float32 (``--float32``, or no native bf16) — with one process
the three make the same operations, so only reduction order and kernels' nondeterminism may
differ (on the tiny CPU run they are bitwise equal).

Output: ``--out`` (rank 0; other ranks ``<out>.rank<N>.json``), gpu_check's ``Report`` format
(header, ``sections.distributed``, ``checks``, ``failed_assertions``, ``incomplete``), rewritten
after every arm. Exit code 0 / 1 / 3 as gpu_check's. ``--budget-s`` skips an arm (recorded as
incomplete) once less time is left than the previous arm took × 1.5.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import math
import os
import platform
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ARMS = ("a_plain", "b_ddp", "c_fsdp2")
BF16_LOSS_RTOL = 1e-3      # per-step losses of b / c against a under bf16 autocast
FLOAT32_LOSS_RTOL = 1e-5   # the same in float32
PG_TIMEOUT_S = 300         # a collective that waits longer than this fails (one process: never)


def load_gpu_check():
    """benchmarks/gpu_check.py as a module (its shapes, data, report and helpers)."""
    name = "kdbench_gpu_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


G = load_gpu_check()


def log(msg: str) -> None:
    print(f"[dist_check rank {os.environ.get('RANK', '0')}] {msg}", flush=True)


class RssPeak:
    """The process's largest resident set while the block runs (``/proc/self/statm`` every 5 ms)."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak_mb, self._stop = every_s, G.rss_mb(), threading.Event()

    def _watch(self):
        while not self._stop.wait(self.every_s):
            now = G.rss_mb()
            if now is not None and (self.peak_mb is None or now > self.peak_mb):
                self.peak_mb = now

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        now = G.rss_mb()
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(device_type: str) -> tuple[torch.device, str]:
    """Join the process group as the launcher set it up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` / ``MASTER_PORT``), or, started without a launcher, a one-process group of its
    own. Returns (this rank's device, how it was launched)."""
    import torch.distributed as dist

    launcher = "torch.distributed.run" if "RANK" in os.environ else "none: a one-process group of its own"
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    if device_type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks are on this machine: loopback
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return device, launcher


def environment(device: torch.device, launcher: str) -> dict:
    import torch.distributed as dist
    import transformers

    out = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "rank": dist.get_rank(),
           "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "device": str(device), "launcher": launcher,
           "pid": os.getpid(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "nccl": None, "nccl_available": dist.is_nccl_available(), "gloo_available": dist.is_gloo_available(),
           "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
           "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG",
                                                  "TORCH_NCCL_ASYNC_ERROR_HANDLING", "GLOO_SOCKET_IFNAME",
                                                  "PYTORCH_CUDA_ALLOC_CONF", "MASTER_ADDR", "MASTER_PORT")}}
    if device.type == "cuda":
        try:
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except Exception as exc:  # noqa: BLE001 - recorded as unreadable
            out["nccl"] = f"unreadable: {type(exc).__name__}: {exc}"
        p = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability(device)),
                      "total_memory_gib": p.total_memory / 2**30, "device_count": torch.cuda.device_count()}
    else:
        out["cpu"] = G.cpu_model_name()
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        out["fsdp2"] = True
    except ImportError as exc:
        out["fsdp2"] = f"unavailable: {exc}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="dist_check.json", help="the JSON file rank 0 writes (default: dist_check.json)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu; --tiny: cpu); "
                                                    "on CUDA each rank takes cuda:<LOCAL_RANK>")
    ap.add_argument("--tiny", action="store_true", help="gpu_check's tiny shapes and steps (the tests run it)")
    ap.add_argument("--float32", action="store_true", help="train in float32 (bf16 autocast off): losses agree to 1e-5")
    ap.add_argument("--warmup", type=int, default=None, help="steps before the clock starts (default: section 2's)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: section 2's)")
    ap.add_argument("--budget-s", type=float, default=math.inf,
                    help="skip an arm once less time is left than the last arm took x 1.5 (default: no limit)")
    args = ap.parse_args(argv)
    started = time.monotonic()
    want = (args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")).split(":")[0]
    if want not in ("cuda", "cpu"):
        print(f"dist_check: --device must be cuda or cpu, not {args.device!r}", file=sys.stderr)
        return 2
    if want == "cuda" and not torch.cuda.is_available():
        print("dist_check: CUDA is not available here", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)

    import torch.distributed as dist

    device, launcher = join(want)
    rank = dist.get_rank()
    out_path = Path(args.out) if rank == 0 else Path(f"{args.out}.rank{rank}.json")
    header = {"script": "benchmarks/dist_check.py", "argv": sys.argv if argv is None else ["dist_check.py", *argv],
              "device": str(device), "tiny": args.tiny, "pid": os.getpid(), "budget_s": args.budget_s,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node()}
    report = G.Report(out_path, header)
    sec = report.data["sections"]["distributed"] = {"status": "running"}
    try:
        run(args, device, launcher, report, sec, started)
        sec["status"] = "done"
    except BaseException as exc:  # noqa: BLE001 - recorded, then the exit code says so
        sec["status"] = "error"
        sec["error"] = traceback.format_exc(limit=8)
        report.check("dist_check runs without an exception", False, error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        sec["wall_s"] = round(time.monotonic() - started, 2)
        report.flush()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving a broken group is not the result
            pass
    return report.finish()


def run(args, device: torch.device, launcher: str, report, sec: dict, started: float) -> None:
    from transformers import GPT2LMHeadModel

    from kdbench.device import inference_dtype, native_bf16
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.teacher import LiveTeacher
    from kdbench.engine.trainer import train
    from kdbench.engine.tuning import step_tuning
    from kdbench.modeling import StudentBody
    from kdbench.registry import get_objective
    from kdbench.suites.spec import TrainSpec

    env = sec["environment"] = environment(device, launcher)
    world = env["world_size"]
    report.check("distributed: the backend is NCCL on CUDA, gloo on the CPU", env["backend"] ==
                 ("nccl" if device.type == "cuda" else "gloo"), backend=env["backend"], device=str(device))
    log(f"{env['backend']} world {world} on {device} ({(env.get('gpu') or {}).get('name', env.get('cpu'))}), "
        f"torch {env['torch']}, NCCL {env['nccl']}")

    t0 = time.monotonic()
    S = G.make_shapes(args.tiny)
    pairs = G.load_pairs(8 if args.tiny else 1)
    teacher = G.build_model(GPT2LMHeadModel, S.teacher, 1, device)          # as gpu_check's paper_models
    teacher = teacher.to(inference_dtype(device)).eval().requires_grad_(False)
    template = G.build_model(GPT2LMHeadModel, S.student, 2, device)
    examples = G.make_examples(pairs, S.n_examples, S.student.vocab_size, S.max_prompt, S.max_tokens, seed=20)
    warmup = S.warmup if args.warmup is None else args.warmup
    timed = S.timed if args.steps is None else args.steps
    n_steps = warmup + timed
    spec = TrainSpec(steps=n_steps, batch_size=S.batch, lr=1e-4, warmup_steps=1, log_every=1,
                     max_prompt_tokens=S.max_prompt, max_tokens=S.max_tokens, bf16_autocast=not args.float32)
    bf16 = spec.bf16_autocast and native_bf16(device)
    rtol = BF16_LOSS_RTOL if bf16 else FLOAT32_LOSS_RTOL
    live = LiveTeacher(teacher)
    tuning = step_tuning(device, model=template, spec=spec, teacher=live)
    G.free_memory(device)
    src = PackedBatches(examples, S.batch, 0)
    first = [next(src) for _ in range(n_steps)]
    sec["setup"] = {"shapes": S.name, "teacher_params": G.n_params(teacher), "student_params": G.n_params(template),
                    "teacher_dtype": str(next(teacher.parameters()).dtype), "teacher": "live, replicated",
                    "vocab": S.student.vocab_size, "batch": S.batch, "warmup_steps": warmup, "timed_steps": timed,
                    "mean_tokens_per_step": sum(b.n_tokens for b in first) / n_steps,
                    "objective": "kl", "precision": "bf16 autocast" if bf16 else "float32",
                    "loss_rtol": rtol, "tuning (every arm)": tuning.to_dict(), "build_s": time.monotonic() - t0}
    report.flush()
    kl = get_objective("kl")
    arms = sec.setdefault("arms", {})
    estimate = [0.0]

    def wrap(name: str, lm: torch.nn.Module) -> torch.nn.Module:
        if name == "a_plain":
            return lm
        if name == "b_ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(StudentBody(lm), device_ids=[device] if device.type == "cuda" else None)
        from kdbench.engine.fsdp import shard_student

        return shard_student(lm, device)

    # what the first arm alone would pay, paid by none: the process's first calls and each step's
    # shapes (a packed batch has a new length every step: oneDNN compiles bf16 primitives per
    # shape on the CPU, cuBLAS picks its kernels per shape) -- the plain model over the same
    # steps first, unrecorded
    t = time.monotonic()
    torch.manual_seed(0)
    train(model=copy.deepcopy(template).train(), objective=kl, batches=PackedBatches(examples, S.batch, 0),
          teacher=live, spec=spec, device=device, tuning=tuning, progress=False)
    G.sync(device)
    estimate[0] = sec["setup"]["warmup_pass_s"] = time.monotonic() - t
    G.free_memory(device)
    report.flush()
    for name in ARMS:
        out = arms.setdefault(name, {})
        if name == "a_plain" and world > 1:
            out["skipped"] = f"world {world}: a bare model would not average its gradients across the ranks"
            continue
        if name == "c_fsdp2" and env["fsdp2"] is not True:
            out["skipped"] = f"no FSDP2 in this torch ({env['fsdp2']})"
            continue
        left = args.budget_s - (time.monotonic() - started)
        if left < estimate[0] * 1.5:
            out["skipped"] = f"time box: {left:.0f} s left, the arm needs ~{estimate[0] * 1.5:.0f} s"
            report.incomplete(f"distributed[{name}]: skipped ({out['skipped']})")
            continue
        t = time.monotonic()
        G.reset_peaks(device)
        if device.type == "cuda":   # the teacher and the template stay resident under every arm
            out["gpu_allocated_at_start_mb"] = torch.cuda.memory_allocated(device) / 2**20
        out["host_rss_at_start_mb"] = G.rss_mb()
        torch.manual_seed(0)
        lm = copy.deepcopy(template).train()
        model = wrap(name, lm)
        out["wrapper"] = type(model).__name__ + ("(StudentBody)" if name == "b_ddp" else "")
        rec = G.recorder(device)
        with RssPeak() as rss:
            res = train(model=model, objective=kl, batches=PackedBatches(examples, S.batch, 0), teacher=live,
                        spec=spec, device=device, hooks=rec, tuning=tuning, progress=False)
            G.sync(device)
        out.update(G.window(rec.times, warmup))
        out["trainer_tokens_per_s"] = res.tokens_per_s
        if device.type == "cuda":
            out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            out["gpu_max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        out["host_rss_peak_mb"] = rss.peak_mb
        out["first_losses"] = rec.losses[:3]
        out["losses"] = rec.losses
        out["parallel"] = res.parallel
        out["param_types"] = sorted({type(p).__name__ for p in lm.parameters()})
        out["all_losses_finite"] = len(rec.losses) == n_steps and all(math.isfinite(x) for x in rec.losses)
        report.check(f"distributed[{name}]: {n_steps} steps, every loss finite", out["all_losses_finite"],
                     steps=len(rec.losses))
        if name == "c_fsdp2":
            report.check("distributed[c_fsdp2]: every parameter is a DTensor shard", out["param_types"] == ["DTensor"],
                         param_types=out["param_types"])
        estimate[0] = out["arm_s"] = time.monotonic() - t
        log(f"arm {name}: {out['tokens_per_s'] or 0:.0f} tok/s, {out['s_per_step'] or 0:.4f} s/step, "
            f"peak {out.get('gpu_max_allocated_mb', out['host_rss_peak_mb']) or 0:.0f} MB, "
            f"first loss {rec.losses[0]:.6g}")
        del model, lm, rec
        gc.collect()
        report.flush()

    ref_name = "a_plain" if arms["a_plain"].get("losses") else "b_ddp"
    ref = arms.get(ref_name, {}).get("losses")
    agreement = sec["agreement"] = {"reference": ref_name, "precision": sec["setup"]["precision"], "rtol": rtol}
    for name in ARMS:
        got = arms[name].get("losses")
        if name == ref_name or not got or not ref:
            continue
        if len(got) != len(ref):
            report.check(f"distributed[{name}]: as many steps as {ref_name}", False, steps=len(got),
                         reference_steps=len(ref))
            continue
        diffs = [G.rel_scalar(x, y) for x, y in zip(got, ref)]
        agreement[name] = {"max_rel_diff": max(diffs), "per_step_rel_diff": diffs,
                           "bitwise": got == ref}
        report.check_le(f"distributed[{name}]: per-step losses equal {ref_name}'s (max rel., "
                        f"{sec['setup']['precision']})", max(diffs), rtol)
    if arms.get("a_plain", {}).get("tokens_per_s"):
        sec["tokens_per_s_over_a_plain"] = {n: arms[n]["tokens_per_s"] / arms["a_plain"]["tokens_per_s"]
                                            for n in ARMS if arms[n].get("tokens_per_s")}
    log("agreement with " + ref_name + ": " + ", ".join(
        f"{n} {v['max_rel_diff']:.2e}" for n, v in agreement.items() if isinstance(v, dict)) + f" (rtol {rtol:g})")


if __name__ == "__main__":
    sys.exit(main())
