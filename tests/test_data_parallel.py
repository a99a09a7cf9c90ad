"""The scale-out seam: ``train()`` on two real processes (gloo, CPU).

Two ranks each wrap ``StudentBody(student)`` in DistributedDataParallel, draw every step's
batch of the suite's order and train their half of it (``micro_batches``), with accumulation 1
and 2. DDP averages their gradients, each half's loss sum divided by the whole step's count
over the world size, so after every step both ranks hold the same weights, and those are the
weights of one process taking, at each step, the gradient of the whole batch's mean loss (SGD
here: the comparison sees the gradient's scale, which AdamW would hide; tests/test_world_size.py
runs the real optimiser). Beside it, in the same processes, the two ways this goes wrong
without a word: the bare LM (the ranks drift apart) and DDP around the bare LM (training never
calls its forward, so no all-reduce would run; refused with a message).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kdbench.engine.batches import PackedBatches, micro_batches
from kdbench.engine.state import lr_at
from kdbench.engine.teacher import LiveTeacher
from kdbench.engine.trainer import LogHooks, train
from kdbench.modeling import final_hidden, output_head
from kdbench.registry import get_objective

try:
    from tests.engine_helpers import SPEC, fresh, join_gloo, run_on_ranks, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, fresh, join_gloo, run_on_ranks, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
WORLD, STEPS, BATCH = 2, 3, 4
# a large learning rate: each step moves the weights far beyond float32 rounding, so a step
# with another gradient (a rank's own, unreduced) cannot pass for the reduced one
SPEC_DP = dataclasses.replace(SPEC, steps=STEPS, batch_size=BATCH, lr=0.5, warmup_steps=0)


def sgd(lm):
    # SGD: the update is linear in the gradient, so "same gradient" shows as "same weights" at
    # float32 tolerance (AdamW's first step, g / (|g| + eps), would magnify rounding near g = 0)
    return torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=SPEC_DP.lr)


def _rank(rank: int, paths: dict, enc, pad_id: int) -> dict:
    """One rank: DDP(StudentBody) training, bare-LM training, and the DDP(LM) refusal."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kdbench.modeling import StudentBody
    from kdbench.models import load_causal_lm

    teacher = LiveTeacher(load_causal_lm(paths["teacher"]).eval().requires_grad_(False))
    result = {}
    for arm, accumulation in (("ddp", 1), ("ddp x2", 2), ("bare", 1)):
        lm = load_causal_lm(paths["student"])
        model = lm if arm == "bare" else DDP(StudentBody(lm))
        losses = []
        train(model=model, objective=get_objective("kl"), teacher=teacher, spec=SPEC_DP, device=CPU,
              batches=PackedBatches(enc, BATCH, 0, pad_id), optimizer=sgd(lm), accumulation=accumulation,
              hooks=LogHooks(lambda s, p: losses.append(p["loss"])), progress=False)
        result[arm] = {"weights": {k: v.clone() for k, v in lm.state_dict().items()}, "losses": losses}
    try:
        final_hidden(DDP(load_causal_lm(paths["student"])), next(PackedBatches(enc, BATCH, 0, pad_id)))
        result["ddp_of_lm"] = "no error"
    except TypeError as exc:
        result["ddp_of_lm"] = str(exc)
    return result


@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory):
    paths = {"teacher": str(tiny["teacher_path"]), "student": str(tiny["student_path"])}
    return run_on_ranks(_rank, tmp_path_factory.mktemp("ddp"), (paths, tiny["enc"], tiny["tok"].pad_token_id),
                        world=WORLD)


def one_process_reference(tiny):
    """What DDP should compute: each step, the gradient of the whole batch's mean loss."""
    lm = fresh(tiny)
    objective, teacher = get_objective("kl"), LiveTeacher(tiny["teacher"])
    source = PackedBatches(tiny["enc"], BATCH, 0, tiny["tok"].pad_token_id)
    opt, params, head = sgd(lm), [p for p in lm.parameters() if p.requires_grad], output_head(lm)
    losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, SPEC_DP)
        batch = next(source)
        loss = objective.from_hidden(final_hidden(lm, batch), head, teacher.hidden(batch), teacher.head,
                                     labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, SPEC_DP.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return lm, losses


def test_ranks_hold_the_same_weights_after_every_step(ranks, tiny):
    before = tiny["student0"].state_dict()
    for arm in ("ddp", "ddp x2"):
        for k, v in ranks[0][arm]["weights"].items():
            assert torch.equal(v, ranks[1][arm]["weights"][k]), (arm, k)
    assert any(not torch.equal(v, before[k]) for k, v in ranks[0]["ddp"]["weights"].items())
    # the control: without the wrapper each rank follows its own half of the batches, silently
    assert any(not torch.equal(v, ranks[1]["bare"]["weights"][k]) for k, v in ranks[0]["bare"]["weights"].items())


def test_ddp_steps_are_the_gradient_of_the_whole_batch_mean(ranks, tiny):
    lm, losses = one_process_reference(tiny)
    start = tiny["student0"].state_dict()
    for arm in ("ddp", "ddp x2"):
        for r in range(WORLD):  # each rank logs the step's loss: the whole batch's, all-reduced
            assert ranks[r][arm]["losses"] == pytest.approx(losses, rel=1e-5), (arm, r)
        # the steps taken, compared at a tolerance relative to their size, plus one rounding of the
        # weights they were added to: one process sums the batch's gradient in another order, and
        # where a step is 1e5 times smaller than its weight (the query projection's) a different
        # last bit flips that rounding
        for k, v in lm.state_dict().items():
            ours, want = ranks[0][arm]["weights"][k] - start[k], v - start[k]
            atol = 1e-4 * float(want.abs().max()) + torch.finfo(v.dtype).eps * float(v.abs().max())
            torch.testing.assert_close(ours, want, rtol=1e-4, atol=atol, msg=(arm, k))


def test_ddp_around_the_bare_lm_is_refused_with_the_fix(ranks):
    msg = ranks[0]["ddp_of_lm"]
    assert "wrap kdbench.modeling.StudentBody(model) instead" in msg and "DistributedDataParallel" in msg


def test_the_ranks_shares_are_the_steps_examples_each_once(tiny):
    """Every rank draws the whole step from one cursor (the source's: no rank, no world size in
    it) and keeps its own examples; together the shares are the batch, sequence for sequence."""
    source = PackedBatches(tiny["enc"], BATCH, 0, tiny["tok"].pad_token_id)
    assert "world" not in source.state_dict()
    batch = next(source)
    shares = [micro_batches(batch, r, WORLD, 1)[0] for r in range(WORLD)]
    assert sorted(i for s in shares for i in s.example_ids) == sorted(batch.example_ids)
    assert sum(s.n_counted for s in shares) == batch.n_counted and sum(s.n_tokens for s in shares) == batch.n_tokens
    by_id = {i: e.ids for s in shares for i, e in zip(s.example_ids, s.encoded)}
    assert [by_id[i] for i in batch.example_ids] == [e.ids for e in batch.encoded]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        micro_batches(batch, WORLD, WORLD, 1)
