"""The scale-out seam: the unchanged ``train()`` on two real processes (gloo, CPU).

Two ranks each wrap ``StudentBody(student)`` in DistributedDataParallel and draw their share of
the suite's order (``RankBatches``). DDP averages their gradients, so after every step both
ranks hold the same weights, and those are the weights of one process taking, at each step,
the gradient of the mean of the two ranks' losses. Beside it, in the same processes, the two
ways this goes wrong without a word: the bare LM (the ranks drift apart) and DDP around the bare
LM (training never calls its forward, so no all-reduce would run; refused with a message).
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import os
import pickle

import pytest
import torch

from kdbench.engine.batches import PackedBatches, RankBatches
from kdbench.engine.state import lr_at
from kdbench.engine.teacher import LiveTeacher
from kdbench.engine.trainer import LogHooks, train
from kdbench.modeling import final_hidden, output_head
from kdbench.registry import get_objective

try:
    from tests.engine_helpers import SPEC, fresh, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, fresh, tiny  # noqa: F401

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


def _rank(rank: int, init_file: str, paths: dict, enc, pad_id: int, out: str) -> None:
    """One rank: DDP(StudentBody) training, bare-LM training, and the DDP(LM) refusal."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kdbench.modeling import StudentBody
    from kdbench.models import load_causal_lm

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this machine: loopback, whatever the hostname resolves to
    # a rank that fails leaves the other in a collective: give up after a minute, not gloo's 30
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        teacher = LiveTeacher(load_causal_lm(paths["teacher"]).eval().requires_grad_(False))
        result = {}
        for arm in ("ddp", "bare"):
            lm = load_causal_lm(paths["student"])
            model = DDP(StudentBody(lm)) if arm == "ddp" else lm
            losses = []
            train(model=model, objective=get_objective("kl"), teacher=teacher, spec=SPEC_DP, device=CPU,
                  batches=RankBatches(PackedBatches(enc, BATCH, 0, pad_id), rank, WORLD), optimizer=sgd(lm),
                  hooks=LogHooks(lambda s, p: losses.append(p["loss"])), progress=False)
            result[arm] = {"weights": {k: v.clone() for k, v in lm.state_dict().items()}, "losses": losses}
        try:
            final_hidden(DDP(load_causal_lm(paths["student"])), next(PackedBatches(enc, BATCH, 0, pad_id)))
            result["ddp_of_lm"] = "no error"
        except TypeError as exc:
            result["ddp_of_lm"] = str(exc)
        with open(out, "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    paths = {"teacher": str(tiny["teacher_path"]), "student": str(tiny["student_path"])}
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per rank, as torchrun gives
    procs = [ctx.Process(target=_rank, args=(r, str(tmp / "init"), paths, tiny["enc"], tiny["tok"].pad_token_id,
                                             str(tmp / f"rank{r}.pkl"))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD, "a rank failed; its traceback is above"
    return [pickle.load(open(tmp / f"rank{r}.pkl", "rb")) for r in range(WORLD)]


def one_process_reference(tiny):
    """What DDP should compute: each step, the gradient of the mean of the two ranks' losses."""
    lm = fresh(tiny)
    objective, teacher = get_objective("kl"), LiveTeacher(tiny["teacher"])
    source = PackedBatches(tiny["enc"], BATCH, 0, tiny["tok"].pad_token_id)
    opt, params, head = sgd(lm), [p for p in lm.parameters() if p.requires_grad], output_head(lm)
    losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, SPEC_DP)
        per_rank = []
        for batch in [next(source) for _ in range(WORLD)]:
            out = objective.from_hidden(final_hidden(lm, batch), head, teacher.hidden(batch), teacher.head,
                                        labels=batch.labels)
            per_rank.append(out.loss)
        (sum(per_rank) / WORLD).backward()
        torch.nn.utils.clip_grad_norm_(params, SPEC_DP.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append([loss.item() for loss in per_rank])
    return lm, losses


def test_ranks_hold_the_same_weights_after_every_step(ranks, tiny):
    before = tiny["student0"].state_dict()
    for k, v in ranks[0]["ddp"]["weights"].items():
        assert torch.equal(v, ranks[1]["ddp"]["weights"][k]), k
    assert any(not torch.equal(v, before[k]) for k, v in ranks[0]["ddp"]["weights"].items())
    # the control: without the wrapper each rank follows its own batches, silently
    assert any(not torch.equal(v, ranks[1]["bare"]["weights"][k]) for k, v in ranks[0]["bare"]["weights"].items())


def test_ddp_steps_are_the_mean_gradient_of_the_ranks_losses(ranks, tiny):
    lm, losses = one_process_reference(tiny)
    for r in range(WORLD):  # each rank's logged loss is its own batch's
        assert ranks[r]["ddp"]["losses"] == pytest.approx([step[r] for step in losses], rel=1e-5)
    start = tiny["student0"].state_dict()
    for k, v in lm.state_dict().items():  # the steps taken, compared at a tolerance relative to their size
        ours, want = ranks[0]["ddp"]["weights"][k] - start[k], v - start[k]
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=k)


def test_ddp_around_the_bare_lm_is_refused_with_the_fix(ranks):
    msg = ranks[0]["ddp_of_lm"]
    assert "wrap kdbench.modeling.StudentBody(model) instead" in msg and "DistributedDataParallel" in msg


def test_a_rank_cursor_resumes_only_its_own_share(tiny):
    pad = tiny["tok"].pad_token_id
    a = RankBatches(PackedBatches(tiny["enc"], BATCH, 0, pad), 1, WORLD)
    next(a)
    b = RankBatches(PackedBatches(tiny["enc"], BATCH, 0, pad), 1, WORLD)
    b.load_state_dict(a.state_dict())
    assert next(b).example_ids == next(a).example_ids
    with pytest.raises(ValueError, match="cannot resume rank 0 of 2"):
        RankBatches(PackedBatches(tiny["enc"], BATCH, 0, pad), 0, WORLD).load_state_dict(a.state_dict())
    whole = PackedBatches(tiny["enc"], BATCH, 0, pad)
    shares = [RankBatches(PackedBatches(tiny["enc"], BATCH, 0, pad), r, WORLD) for r in range(WORLD)]
    assert [next(s).example_ids for s in shares] == [next(whole).example_ids for _ in range(WORLD)]
