"""Fully sharded training (FSDP2, kdbench/engine/fsdp.py) takes the steps one process takes.

Two real processes (gloo, CPU, one thread each) train the tiny student sharded
(``shard_student``: each decoder block and the root, embeddings tied to the head, as shards),
``kl`` from a live teacher replicated on both, the real AdamW, 5 steps of the suite's batch:

* against one process taking each step's batch whole: the same logged losses (1e-5 relative)
  and the same weights (1e-4 of how far training moved them), at every validation (the whole
  weights gathered for it, rank 0 alone reading them) and at the end, where the best step's
  weights, kept as the ranks' shards, are restored; with accumulation 2 as well;
* ``ce`` without a teacher (how a teacher is fine-tuned) likewise;
* a sharded checkpoint saved at step 2 (each rank its shards, torch.distributed.checkpoint in
  safetensors, no pickle) and resumed by two new processes' fresh shards: the rest of the run
  is the uninterrupted one's, bit for bit.

Beside them, in one process: the loss made inside the forward (``StudentLoss``, unsharded) is
the trainer's own path, bit for bit.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from kdbench.engine.batches import PackedBatches
from kdbench.engine.teacher import LiveTeacher
from kdbench.engine.trainer import TrainHooks, train
from kdbench.modeling import StudentLoss
from kdbench.registry import get_objective

try:
    from tests.engine_helpers import SPEC, assert_same_steps, fresh, join_gloo, run_on_ranks, step_differences, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, assert_same_steps, fresh, join_gloo, run_on_ranks, step_differences, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
WORLD, STEPS, BATCH = 2, 5, 4
SPEC_FS = dataclasses.replace(SPEC, steps=STEPS, batch_size=BATCH, warmup_steps=1, log_every=1)
LOSS_RTOL = 1e-5
#: validation every 2 steps and at the last; the scores pick step 2, so its weights are kept
#: (as shards), saved in the step-2 checkpoint and restored at the end
SCORES = {2: 3.0, 4: 1.0, 5: 2.0}


def _fsdp_supported() -> str | None:
    """Why this torch cannot run the test (None: it can)."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"this torch has no FSDP2 / DCP safetensors storage: {exc}"
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "this torch has no gloo backend"
    return None


class Watched(TrainHooks):
    """Notes each step's loss and, at each validation, the whole weights it was given (rank 0
    only, as the recipe validates); scores from :data:`SCORES`; ``on_step`` as given."""

    def __init__(self, valid_every: int, reads_model: bool = True, on_step=None):
        self.valid_every, self.reads_model, self._on_step = valid_every, reads_model, on_step
        self.losses, self.valid_weights, self.step = [], {}, 0

    def on_log(self, step, point):
        self.losses.append(point["loss"])
        self.step = step

    def validate(self, model):
        if self.reads_model:
            assert not any(hasattr(v, "full_tensor") for v in model.state_dict().values()), "validation got shards"
            self.valid_weights[self.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return SCORES[self.step]

    def on_step(self, state, optimizer):
        if self._on_step is not None:
            self._on_step(state, optimizer)


def _sharded_run(paths: dict, enc, pad_id: int, teacher, *, accumulation: int, valid_every: int, rank: int,
                 objective: str = "kl", save_to=None, resume_from=None) -> dict:
    """One sharded ``train()`` on this rank: fresh shards of the student, maybe saving at step 2
    or resuming from a saved state; returns its losses, validations and whole final weights."""
    from kdbench.engine import fsdp
    from kdbench.engine.trainer import make_optimizer
    from kdbench.models import load_causal_lm

    lm = load_causal_lm(paths["student"])
    student = fsdp.shard_student(lm, CPU)
    opt = make_optimizer(lm, SPEC_FS, CPU)  # over the shards
    batches, state = PackedBatches(enc, BATCH, 0, pad_id), None
    if resume_from is not None:
        state, _ = fsdp.load(resume_from, student, opt, batches)

    def save_at_2(st, o):
        if save_to is not None and st.step == 2:
            fsdp.save(save_to, st, student, o, batches)

    hooks = Watched(valid_every, reads_model=rank == 0, on_step=save_at_2)
    local = sum(p.to_local().numel() for p in lm.parameters())
    res = train(model=student, objective=get_objective(objective), teacher=teacher if objective == "kl" else None,
                spec=SPEC_FS, device=CPU,
                batches=batches, hooks=hooks, state=state, optimizer=opt, accumulation=accumulation, progress=False)
    with student.full_weights() as whole:  # every rank gathers; both keep a copy to compare
        weights = {k: v.detach().clone() for k, v in whole.state_dict().items()}
    return {"losses": hooks.losses, "valid_weights": hooks.valid_weights, "weights": weights,
            "selected_step": res.selected_step, "parallel": res.parallel,
            "shard_fraction": local / sum(p.numel() for p in lm.parameters()),
            "param_types": sorted({type(p).__name__ for p in lm.parameters()})}


def _rank(rank: int, paths: dict, enc, pad_id: int, tmp: str, phase: str) -> dict:
    """One of two processes. Phase "train": the sharded run (saving at step 2) and the run with
    accumulation 2; phase "resume": new shards restored from the step-2 state, trained to the end."""
    from kdbench.models import load_causal_lm

    teacher = LiveTeacher(load_causal_lm(paths["teacher"]).eval().requires_grad_(False))
    state = os.path.join(tmp, "state")
    if phase == "train":
        return {"fsdp": _sharded_run(paths, enc, pad_id, teacher, accumulation=1, valid_every=2, rank=rank,
                                     save_to=state),
                "fsdp x2": _sharded_run(paths, enc, pad_id, teacher, accumulation=2, valid_every=0, rank=rank),
                "fsdp ce": _sharded_run(paths, enc, pad_id, None, accumulation=1, valid_every=0, rank=rank,
                                        objective="ce"),
                "files": sorted(os.listdir(state))}
    return {"resumed": _sharded_run(paths, enc, pad_id, teacher, accumulation=1, valid_every=2, rank=rank,
                                    resume_from=state)}


def _spawn(tiny, tmp, phase: str) -> list[dict]:
    paths = {"teacher": str(tiny["teacher_path"]), "student": str(tiny["student_path"])}
    return run_on_ranks(_rank, tmp, (paths, tiny["enc"], tiny["tok"].pad_token_id, str(tmp), phase), tag=phase,
                        world=WORLD, timeout=240)


@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory):
    """Each rank's results of both phases: the sharded runs, then (new processes) the resumed run."""
    why = _fsdp_supported()
    if why is not None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("fsdp")
    trained = _spawn(tiny, tmp, "train")
    resumed = _spawn(tiny, tmp, "resume")
    return [{**a, **b} for a, b in zip(trained, resumed)]


def _one_process_run(tiny, objective: str, valid_every: int) -> dict:
    lm = fresh(tiny)
    hooks = Watched(valid_every)
    res = train(model=lm, objective=get_objective(objective),
                teacher=LiveTeacher(tiny["teacher"]) if objective == "kl" else None, spec=SPEC_FS, device=CPU,
                batches=PackedBatches(tiny["enc"], BATCH, 0, tiny["tok"].pad_token_id), hooks=hooks, progress=False)
    return {"losses": hooks.losses, "valid_weights": hooks.valid_weights, "selected_step": res.selected_step,
            "weights": {k: v.clone() for k, v in lm.state_dict().items()}}


@pytest.fixture(scope="module")
def one_process(tiny):
    """The reference: one process, the bare LM, each step's batch whole, the same validations
    (and ``ce`` without a teacher, as a teacher is fine-tuned, without validation)."""
    return {"kl": _one_process_run(tiny, "kl", valid_every=2), "ce": _one_process_run(tiny, "ce", valid_every=0)}


def test_the_student_is_sharded_across_the_ranks(ranks):
    for r in ranks:
        run = r["fsdp"]
        assert run["param_types"] == ["DTensor"]  # every parameter, the tied embeddings / head included
        assert run["shard_fraction"] == pytest.approx(1 / WORLD, abs=0.01)
        assert "fsdp2" in run["parallel"]["sharding"] and run["parallel"]["world"] == WORLD


def test_sharded_steps_are_the_whole_batch_steps(ranks, one_process, tiny):
    start = tiny["student0"].state_dict()
    whole = one_process["kl"]
    assert whole["selected_step"] == 2 and ranks[0]["fsdp"]["selected_step"] == 2
    for name in ("fsdp", "fsdp x2"):
        for r in ranks:  # every rank logs the step's loss (all-reduced) and gathers the same weights
            assert r[name]["losses"] == pytest.approx(whole["losses"], rel=LOSS_RTOL), (name, r)
        for k, v in ranks[0][name]["weights"].items():
            assert torch.equal(v, ranks[1][name]["weights"][k]), (name, k)
    # the validations' whole weights (rank 0's, gathered from the shards) at steps 2, 4 and 5
    ours = ranks[0]["fsdp"]["valid_weights"]
    assert sorted(ours) == sorted(whole["valid_weights"]) == [2, 4, 5]
    for step in ours:
        assert_same_steps(ours[step], whole["valid_weights"][step], start, ("validation", step))
    # the end: the best step's (2) weights restored from the ranks' shards
    assert_same_steps(ranks[0]["fsdp"]["weights"], whole["weights"], start, "restored best")
    assert_same_steps(ranks[0]["fsdp"]["weights"], ours[2], start, "restored = validated at 2")
    # accumulation 2 (FSDP's no_sync before the last micro-step), no validation: the last step's weights
    assert_same_steps(ranks[0]["fsdp x2"]["weights"], whole["valid_weights"][5], start, "fsdp x2")
    # no teacher (a teacher's fine-tune): the same
    ce = one_process["ce"]
    for r in ranks:
        assert r["fsdp ce"]["losses"] == pytest.approx(ce["losses"], rel=LOSS_RTOL)
    assert_same_steps(ranks[0]["fsdp ce"]["weights"], ce["weights"], start, "fsdp ce")
    print("\nFSDP2 vs one process:",
          {name: max(abs(a / b - 1) for a, b in zip(ranks[0][name]["losses"], whole["losses"]))
           for name in ("fsdp", "fsdp x2")},
          {f"valid@{s}": step_differences(ours[s], whole["valid_weights"][s], start) for s in ours},
          {"fsdp x2@5": step_differences(ranks[0]["fsdp x2"]["weights"], whole["valid_weights"][5], start)},
          {"ce losses": max(abs(a / b - 1) for a, b in zip(ranks[0]["fsdp ce"]["losses"], ce["losses"])),
           "ce weights": step_differences(ranks[0]["fsdp ce"]["weights"], ce["weights"], start)})


def test_a_sharded_checkpoint_resumes_to_the_uninterrupted_run(ranks):
    # each rank wrote its shards (safetensors) and its generators; rank 0 the JSON; no pickle
    files = ranks[0]["files"]
    assert [f for f in files if not f.startswith("shard-")] == ["rank0.safetensors", "rank1.safetensors", "state.json"]
    assert len([f for f in files if f.startswith("shard-") and f.endswith(".safetensors")]) == WORLD
    assert all(f.endswith((".safetensors", ".json")) for f in files)
    for r in ranks:
        uninterrupted, resumed = r["fsdp"], r["resumed"]
        assert resumed["losses"] == uninterrupted["losses"][2:]  # steps 3 to 5, bit for bit
        assert resumed["selected_step"] == 2  # the best so far came back from the checkpoint (as shards)
        for step in (4, 5):
            for k, v in uninterrupted["valid_weights"].get(step, {}).items():
                assert torch.equal(resumed["valid_weights"][step][k], v), (step, k)
        for k, v in uninterrupted["weights"].items():
            assert torch.equal(resumed["weights"][k], v), k


def test_the_loss_inside_the_forward_is_the_trainers_own(tiny):
    """``StudentLoss`` unsharded, one process: bitwise the bare LM's run (losses and weights)."""
    out = {}
    for name, wrap in (("bare", lambda lm: lm), ("in forward", StudentLoss)):
        lm, hooks = fresh(tiny), Watched(valid_every=0)
        train(model=wrap(lm), objective=get_objective("kl"), teacher=LiveTeacher(tiny["teacher"]),
              spec=dataclasses.replace(SPEC_FS, steps=2), device=CPU,
              batches=PackedBatches(tiny["enc"], BATCH, 0, tiny["tok"].pad_token_id), hooks=hooks, progress=False)
        out[name] = (hooks.losses, lm.state_dict())
    (bare_losses, bare), (ours_losses, ours) = out["bare"], out["in forward"]
    assert ours_losses == bare_losses and len(bare_losses) == 2
    assert all(torch.equal(v, ours[k]) for k, v in bare.items())
