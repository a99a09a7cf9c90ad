"""The global batch is the suite's, whatever the world size (kdbench/engine/trainer.py).

The real ``train()`` with the real AdamW on the tiny pair, 5 steps, four ways of taking each
step's ``batch_size`` examples: (a) one process, the batch whole; (b) one process, accumulation
2; (c) two real processes (gloo, CPU, one thread each), accumulation 1, and (d) two processes
with accumulation 2, where DDP's ``no_sync`` carries the first micro-step. All take the same
steps: the same logged losses (1e-5 relative) and the same weights (1e-4 of how far they moved),
every example of a step trained exactly once, where ``SHARD_RULE`` puts it. Beside them the
parts in one process: the split's refusals, the denominator, a cursor saved under one split
resuming under another.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kdbench.engine import state as S
from kdbench.engine.batches import PackedBatches, micro_batches
from kdbench.engine.teacher import LiveTeacher
from kdbench.engine.trainer import make_optimizer, train
from kdbench.modeling import StudentBody, final_hidden, output_head
from kdbench.registry import get_objective

try:
    from tests.engine_helpers import SPEC, Hooks, assert_same_steps, fresh, join_gloo, run_on_ranks, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, Hooks, assert_same_steps, fresh, join_gloo, run_on_ranks, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
WORLD, STEPS, BATCH = 2, 5, 4
OBJECTIVES = ("kl", "ce")  # a live teacher, and none
SPEC_WS = dataclasses.replace(SPEC, steps=STEPS, batch_size=BATCH, warmup_steps=1, log_every=1)
LOSS_RTOL = 1e-5


class Recorded(StudentBody):
    """The student body that notes the examples of every forward: what each micro-step trained."""

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[list[str]] = []

    def forward(self, batch):
        self.seen.append(list(batch.example_ids))
        return super().forward(batch)


def run(lm, model, objective: str, teacher, enc, pad_id: int, accumulation: int, batches=None, state=None,
        optimizer=None, on_step=None) -> dict:
    """``train()`` as a run calls it, noting each step's loss and micro-batches (``model`` wraps a Recorded)."""
    body = model if isinstance(model, Recorded) else model.module
    losses, steps = [], []

    def step_done(st, opt):
        steps.append(body.seen[:])
        body.seen.clear()
        if on_step is not None:
            on_step(st, opt)

    res = train(model=model, objective=get_objective(objective), teacher=teacher if objective == "kl" else None,
                spec=SPEC_WS, device=CPU, batches=batches or PackedBatches(enc, BATCH, 0, pad_id),
                hooks=Hooks(log=lambda s, p: losses.append(p["loss"]), on_step=step_done), state=state,
                optimizer=optimizer, accumulation=accumulation, progress=False)
    return {"losses": losses, "steps": steps, "parallel": res.parallel, "train_tokens": res.train_tokens,
            "weights": {k: v.clone() for k, v in lm.state_dict().items()}}


def _rank(rank: int, paths: dict, enc, pad_id: int) -> dict:
    """One of two processes: DDP(Recorded(lm)) trained with accumulation 1 and 2, per objective."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kdbench.models import load_causal_lm

    teacher = LiveTeacher(load_causal_lm(paths["teacher"]).eval().requires_grad_(False))
    result = {}
    for objective in OBJECTIVES:
        for accumulation in (1, 2):
            lm = load_causal_lm(paths["student"])
            result[objective, accumulation] = run(lm, DDP(Recorded(lm)), objective, teacher, enc, pad_id, accumulation)
    return result


@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory):
    paths = {"teacher": str(tiny["teacher_path"]), "student": str(tiny["student_path"])}
    return run_on_ranks(_rank, tmp_path_factory.mktemp("world"), (paths, tiny["enc"], tiny["tok"].pad_token_id),
                        world=WORLD)


@pytest.fixture(scope="module")
def one_process(tiny):
    """(objective, accumulation) -> the run in this process."""
    teacher, pad = LiveTeacher(tiny["teacher"]), tiny["tok"].pad_token_id
    out = {}
    for objective in OBJECTIVES:
        for accumulation in (1, 2):
            lm = fresh(tiny)
            out[objective, accumulation] = run(lm, Recorded(lm), objective, teacher, tiny["enc"], pad, accumulation)
    return out


def step_examples(tiny) -> list[list[str]]:
    source = PackedBatches(tiny["enc"], BATCH, 0, tiny["tok"].pad_token_id)
    return [next(source).example_ids for _ in range(STEPS)]


def test_one_step_trains_each_of_its_examples_once_where_the_rule_says(tiny, one_process, ranks):
    for objective in OBJECTIVES:
        for i, ids in enumerate(step_examples(tiny)):
            assert one_process[objective, 1]["steps"][i] == [ids]  # the batch whole, as it comes
            assert one_process[objective, 2]["steps"][i] == [ids[0::2], ids[1::2]]
            # rank r's micro-step a: shard a * world + r, the examples k with k mod (world * accumulation) = shard
            assert [r[objective, 1]["steps"][i] for r in ranks] == [[ids[0::2]], [ids[1::2]]]
            assert [r[objective, 2]["steps"][i] for r in ranks] == [[ids[0::4], ids[2::4]], [ids[1::4], ids[3::4]]]


def test_every_split_takes_the_same_steps(tiny, one_process, ranks):
    start = tiny["student0"].state_dict()
    for objective in OBJECTIVES:
        whole = one_process[objective, 1]
        for accumulation in (1, 2):  # both ranks: the same logged loss and bitwise the same weights
            a, b = (r[objective, accumulation] for r in ranks)
            assert a["losses"] == b["losses"]
            assert all(torch.equal(v, b["weights"][k]) for k, v in a["weights"].items())
        arms = {"1 process x 2 micro-steps": one_process[objective, 2], "2 processes": ranks[0][objective, 1],
                "2 processes x 2 micro-steps": ranks[0][objective, 2]}
        assert any(not torch.equal(v, start[k]) for k, v in whole["weights"].items())
        for name, arm in arms.items():
            assert arm["losses"] == pytest.approx(whole["losses"], rel=LOSS_RTOL), (objective, name)
            assert_same_steps(arm["weights"], whole["weights"], start, (objective, name))
            assert arm["train_tokens"] == whole["train_tokens"]  # every rank counts the step's tokens


def test_the_run_records_its_split(one_process, ranks):
    recorded = {(p["world"], p["accumulation"], p["global_batch"], tuple(p["micro_batch"]))
                for p in [one_process["kl", 1]["parallel"], one_process["kl", 2]["parallel"],
                          ranks[1]["kl", 1]["parallel"], ranks[1]["kl", 2]["parallel"]]}
    assert recorded == {(1, 1, BATCH, (4, 4)), (1, 2, BATCH, (2, 2)), (2, 1, BATCH, (2, 2)), (2, 2, BATCH, (1, 1))}
    assert "k mod (world * accumulation)" in ranks[1]["kl", 1]["parallel"]["shard_rule"]


def test_a_batch_too_small_to_split_is_refused(tiny):
    batch = PackedBatches(tiny["enc"], 3, 0, tiny["tok"].pad_token_id).peek()
    assert [len(b.example_ids) for b in micro_batches(batch, 0, 2, 1)] == [2]  # shards differ by one at most
    with pytest.raises(ValueError, match="a batch of 3 examples cannot be split into 2 processes x 2 accumulation"):
        micro_batches(batch, 0, 2, 2)
    with pytest.raises(ValueError, match="a batch of 4 examples cannot be split into 1 processes x 5 accumulation"):
        train(model=fresh(tiny), objective=get_objective("ce"), teacher=None, spec=SPEC_WS, device=CPU,
              batches=PackedBatches(tiny["enc"], BATCH, 0), accumulation=5, progress=False)


def test_a_denominator_divides_the_sums(tiny):
    """Two micro-batches, each over the whole batch's count, add up to the whole batch's mean."""
    lm, objective = fresh(tiny), get_objective("ce")
    batch = PackedBatches(tiny["enc"], BATCH, 0, tiny["tok"].pad_token_id).peek()
    with torch.no_grad():
        whole = objective.from_hidden(final_hidden(lm, batch), output_head(lm), labels=batch.labels).loss
        halves = [objective.from_hidden(final_hidden(lm, b), output_head(lm), labels=b.labels,
                                        denominator=batch.n_counted).loss for b in micro_batches(batch, 0, 1, 2)]
    assert float(sum(halves)) == pytest.approx(float(whole), rel=LOSS_RTOL)


def test_a_cursor_saved_under_one_split_resumes_under_another(tiny, one_process, tmp_path):
    """2 steps with accumulation 2, saved; restored and finished whole: the whole run's steps."""
    pad = tiny["tok"].pad_token_id
    first, batches = fresh(tiny), PackedBatches(tiny["enc"], BATCH, 0, pad)
    opt = make_optimizer(first, SPEC_WS, CPU)

    def save_at_2(st, o):
        if st.step == 2:
            S.save(tmp_path / "state", st, first, o, batches)
    run(first, Recorded(first), "ce", None, tiny["enc"], pad, 2, batches=batches, optimizer=opt, on_step=save_at_2)

    second, batches2 = fresh(tiny), PackedBatches(tiny["enc"], BATCH, 0, pad)
    opt2 = make_optimizer(second, SPEC_WS, CPU)
    restored, _ = S.load(tmp_path / "state", second, opt2, batches2)
    rest = run(second, Recorded(second), "ce", None, tiny["enc"], pad, 1, batches=batches2, state=restored,
               optimizer=opt2)
    whole = one_process["ce", 1]
    assert rest["steps"] == whole["steps"][2:]
    assert rest["losses"] == pytest.approx(whole["losses"][2:], rel=LOSS_RTOL)
    assert_same_steps(rest["weights"], whole["weights"], tiny["student0"].state_dict(), "resumed")
