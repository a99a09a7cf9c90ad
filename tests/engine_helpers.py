"""The engine tests' shared parts: a tiny random Llama teacher / student with the real SmolLM2
tokenizer (tests/tiny_models.py), real chatterbot-corpus examples, a small TrainSpec."""

from __future__ import annotations

import copy

import pytest

from kdbench.data.batching import encode
from kdbench.engine.trainer import TrainHooks
from kdbench.suites import TrainSpec

try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

SPEC = TrainSpec(steps=4, batch_size=4, max_prompt_tokens=48, max_tokens=64, warmup_steps=1, log_every=1,
                 bf16_autocast=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kdbench.data.micro import build_splits
    from kdbench.models import load_causal_lm, load_tokenizer

    teacher_path, student_path = make_tiny_pair(tmp_path_factory.mktemp("engine_models"))
    tok = load_tokenizer(teacher_path)
    train_split = build_splits(0.05, 0.12)["train"][:24]
    enc = [(e.id, encode(tok, e.prompt, e.references[0], SPEC.max_prompt_tokens, SPEC.max_tokens, ""))
           for e in train_split]
    teacher = load_causal_lm(teacher_path).eval().requires_grad_(False)
    student0 = load_causal_lm(student_path)
    return {"tok": tok, "enc": enc, "teacher": teacher, "student0": student0, "teacher_path": teacher_path,
            "student_path": student_path}


def fresh(tiny):
    return copy.deepcopy(tiny["student0"]).train()



class Hooks(TrainHooks):
    """The trainer's hooks made of plain functions, for tests that watch one of them."""

    def __init__(self, log=None, validate=None, valid_every=0, on_step=None):
        self.valid_every = valid_every
        self._log, self._validate, self._on_step = log, validate, on_step

    def on_log(self, step, point):
        if self._log is not None:
            self._log(step, point)

    def validate(self, model):
        return self._validate(model) if self._validate is not None else super().validate(model)

    def on_step(self, state, optimizer):
        if self._on_step is not None:
            self._on_step(state, optimizer)


STEP_RTOL = 1e-4  # two ways of taking the same steps: their weights apart by this much of how far training moved them


def step_differences(ours: dict, want: dict, start: dict) -> tuple[float, float]:
    """``(‖ours − want‖ / ‖want − start‖ over all weights, the largest such ratio of one tensor)``:
    how far two runs' weights are apart, relative to how far training moved them."""
    moved = {k: float((want[k] - start[k]).norm()) for k in want}
    diff = {k: float((ours[k] - want[k]).norm()) for k in want}
    total = sum(d * d for d in diff.values()) ** 0.5 / sum(m * m for m in moved.values()) ** 0.5
    return total, max(diff[k] / moved[k] if moved[k] else (0.0 if diff[k] == 0 else float("inf")) for k in want)


def assert_same_steps(ours: dict, want: dict, start: dict, what, rtol: float = STEP_RTOL) -> None:
    """Two runs' final weights differ by at most ``rtol`` of how far training moved them
    (norms over all weights), and no tensor by more than ten times that of its own move. Norms,
    not elements: AdamW's g / (sqrt(v) + eps) magnifies float32 rounding where a gradient is near
    eps, so a few of the millions of elements differ by ~3e-4 of the largest step (the worst
    tensor seen, a 4,096-element projection with one such element: 7.5e-5 of its move)."""
    moved = {k: float((want[k] - start[k]).norm()) for k in want}
    diff = {k: float((ours[k] - want[k]).norm()) for k in want}
    assert sum(d * d for d in diff.values()) ** 0.5 <= rtol * sum(m * m for m in moved.values()) ** 0.5, what
    for k in want:
        assert diff[k] <= 10 * rtol * moved[k], (what, k)



def run_on_ranks(target, tmp, args: tuple, *, tag: str = "rank", world: int = 2, timeout: float = 180) -> list:
    """``target(rank, *args)`` in ``world`` fresh interpreters (spawned, as torchrun gives), each in
    a gloo process group (:func:`join_gloo`); returns what each returned, in rank order. A rank
    still running after ``timeout`` seconds is killed (a failed rank leaves the others in a
    collective: their own process-group timeout ends them)."""
    import multiprocessing
    import pickle

    ctx = multiprocessing.get_context("spawn")
    outs = [tmp / f"{tag}{r}.pkl" for r in range(world)]
    procs = [ctx.Process(target=_on_rank, args=(target, r, world, str(tmp / f"init-{tag}"), args, str(outs[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, f"a rank failed ({tag}); its traceback is above"
    return [pickle.loads(o.read_bytes()) for o in outs]


def _on_rank(target, rank: int, world: int, init_file: str, args: tuple, out: str) -> None:
    """One spawned rank of :func:`run_on_ranks`: join, run, write the result, leave."""
    import pickle

    import torch.distributed as dist

    join_gloo(rank, init_file, world)
    try:
        result = target(rank, *args)
        with open(out, "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def join_gloo(rank: int, init_file: str, world: int = 2) -> None:
    """A test rank's process group: gloo on the loopback, one torch thread, and a minute's
    patience (a rank that fails leaves the other in a collective: not gloo's 30 minutes)."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this machine, whatever the hostname resolves to
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
