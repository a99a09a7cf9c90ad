"""Several processes, one run: who this process is among them, how they start, and the few
collectives the run's orchestration needs. Training's own split of a step across processes is
the trainer's (kdbench/engine/trainer.py); this module is what sits around it.

Three ways to start a run on N processes, one result:

* ``kdbench run --num-processes N ...`` — :func:`launch` starts the ranks through torch's own
  launcher (``python -m torch.distributed.run --standalone --nproc-per-node N -m kdbench run ...``,
  without ``--num-processes``), waits for them and exits with their status;
* ``torchrun --nproc-per-node N -m kdbench run ...`` — the same, started by the user;
* ``accelerate launch --multi_gpu --num_processes N -m kdbench run ...`` — accelerate starts the ranks
  through torch's launcher (its ``--cpu`` mode is one process; several only through MPI).

Each rank finds its place in the environment those launchers set (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``: :func:`from_env`), joins the process group (:func:`join`: NCCL on GPUs, gloo on
the CPU; one GPU per rank, ``cuda:<LOCAL_RANK>``) and lets rank 0 orchestrate: rank 0 prepares
the suite (the teacher's fine-tune, the caches, the reference rows) before the others read what
it built (:func:`main_first`), writes the run's row, curves, checkpoints and results alone, and
gathers the evaluation every rank makes of its share of the prompts (:func:`gather`). A waiting rank waits as long as the longest phase may take (``KDBENCH_DIST_TIMEOUT_S``,
default 4 hours); a rank that fails ends the others through the launcher (torch's elastic agent
stops every worker when one exits with an error), never a hang.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from kdbench.errors import UserError

TIMEOUT_ENV_VAR = "KDBENCH_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 4 * 3600  # a waiting rank waits out a teacher fine-tune on a slow machine


@dataclass(frozen=True)
class World:
    """This process among the run's: ``rank`` of ``size`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by a launcher (torchrun / accelerate / --num-processes), even as one process

    @property
    def main(self) -> bool:
        """Rank 0: the one that prepares, writes and evaluates."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env(env=None) -> World:
    """The world torchrun / accelerate / :func:`launch` set (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); one process where they are not set."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {env.get('RANK')!r} / "
                        f"{env.get('WORLD_SIZE')!r} / {env.get('LOCAL_RANK')!r}") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK {rank} is not in [0, WORLD_SIZE={size})")
    return World(rank, size, local, launched="WORLD_SIZE" in env)


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV_VAR, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise UserError(f"${TIMEOUT_ENV_VAR} must be a number of seconds, got {raw!r}") from None
    return datetime.timedelta(seconds=seconds)


def rank_device(world: World, device):
    """The device this rank trains on: ``cuda:<LOCAL_RANK>`` when the run's device is CUDA (one
    GPU per rank; more ranks than GPUs refused), else the CPU."""
    import torch

    if device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    if world.local_rank >= n:
        raise UserError(f"rank {world.rank} (local rank {world.local_rank}) has no GPU: {n} visible on this machine; "
                        f"start at most {n} processes per machine")
    return torch.device("cuda", world.local_rank)


def join(world: World, device) -> None:
    """Join the run's process group (NCCL for CUDA, gloo otherwise), once: on several processes,
    and on one a launcher started (``torchrun --nproc-per-node 1``: the path several take)."""
    import torch.distributed as dist

    if not (world.several or world.launched) or dist.is_initialized():
        return
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timeout(), **kwargs)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.several:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_first(world: World):
    """Rank 0 runs the block first (it builds what the block builds: a fine-tuned teacher, a
    cache entry), then the others run it (and find what rank 0 built)."""
    if not world.main:
        barrier(world)
    yield
    if world.main:
        barrier(world)


def broadcast(world: World, value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not world.several:
        return value
    import torch.distributed as dist

    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lost_peer(world: World, exc: BaseException) -> str | None:
    """What rank 0 records when a collective failed because another rank is gone (killed, out of
    memory, crashed): the ranks it may be and the backend's first line; None for another error.
    (Rank 0 cannot tell which of several others went first; the launcher's summary names it.)"""
    text = str(exc)
    if not world.several or not any(k in text for k in ("Connection closed by peer", "Connection reset by peer",
                                                        "NCCL", "ProcessGroup", "Broken pipe")):
        return None
    others = "rank 1" if world.size == 2 else f"one of ranks 1-{world.size - 1}"
    return f"{others} of {world.size} stopped during the run ({text.splitlines()[0][:300]})"


def gather(world: World, value) -> list | None:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the others."""
    if not world.several:
        return [value]
    import torch.distributed as dist

    out = [None] * world.size if world.main else None
    dist.gather_object(value, out, dst=0)
    return out


# ---------------------------------------------------------------------------------------------
# kdbench run --num-processes N
# ---------------------------------------------------------------------------------------------


def launch(n: int, argv: list[str], *, device_type: str) -> int:
    """Start ``kdbench <argv>`` on ``n`` processes of this machine through torch's launcher and
    return their exit status. Each process gets ``cores // n`` threads unless
    ``OMP_NUM_THREADS`` says otherwise (N processes each using every core slow each other down
    many times over). More processes than GPUs is refused."""
    if device_type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if n > gpus:
            raise UserError(f"--num-processes {n} needs {n} GPUs (one per process); {gpus} visible")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "kdbench", *argv]
    print(f"[kdbench] starting {n} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env)
