"""The engine's seams take what comes next without a change to the trainer.

On-policy distillation (responses sampled from the student being trained, scored by the
teacher) is a *batch source* beside the objective: :class:`~kdbench.engine.samplers.SampledBatches`
(kdbench/engine/samplers.py) is one, written against the seams alone -- ``next()`` gives a packed
:class:`~kdbench.data.batching.Batch`, ``state_dict()`` / ``load_state_dict()`` give its cursor.
The tests train through the unchanged ``train()`` with a live teacher, resume such a run bit for
bit through the unchanged train state (the draws are keyed by the run's seed, the example and the
step, so a resumed source draws the same responses from its cursor alone), and check that the
teacher cache, which holds the teacher's states of the suite's own sequences, refuses them.
(The samplers' own rules, and whole runs with them: tests/test_samplers.py.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kdbench.engine import state as S
from kdbench.engine import teacher_cache
from kdbench.engine.batches import PackedBatches
from kdbench.engine.samplers import SampledBatches, get_sampler
from kdbench.engine.teacher import CachedTeacher, LiveTeacher
from kdbench.engine.trainer import make_optimizer, train
from kdbench.registry import get_objective

try:
    from tests.engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


#: distillm from p = 1 with a buffer of one batch: step 0 samples the student, later steps sample
#: anew or replay (step 3 always replays: its fresh share is 0), the loss looked at every 2 steps
DISTILLM = "distillm(p0=1,capacity=4)"


def sampled(tiny, model, sampler: str = "imitkd") -> SampledBatches:
    """``sampler`` on the tiny pair: a step's 4 prompts answered by ``model``, up to 8 new tokens."""
    tok = tiny["tok"]
    return SampledBatches(PackedBatches(tiny["enc"], 4, 0, tok.pad_token_id), get_sampler(sampler), model, seed=0,
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=8,
                          max_tokens=SPEC.max_tokens, bf16=False, steps=4, valid_every=2,
                          valid_examples=tiny["enc"][:2])


def _train(tiny, model, steps, batches, on_step=None, responses=None, **kw):
    """Train; ``responses`` (a list) collects what the source sampled at each step."""
    points = []

    def step(st, o):
        if responses is not None:
            responses.append(batches.last)
        if on_step is not None:
            on_step(st, o)
    res = train(model=model, objective=get_objective("rkl"), batches=batches, teacher=LiveTeacher(tiny["teacher"]),
                spec=dataclasses.replace(SPEC, steps=steps), device=CPU,
                hooks=Hooks(log=lambda s, p: points.append((s, p["loss"])), on_step=step), progress=False, **kw)
    return res, points


def test_an_on_policy_source_trains_through_the_unchanged_trainer(tiny):
    torch.manual_seed(0)
    model = fresh(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = sampled(tiny, model)
    drawn: list = []
    res, points = _train(tiny, model, 4, source, responses=drawn)
    assert [s for s, _ in points] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(loss)) for _, loss in points)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the student's own responses were trained on, not the references: the token count is theirs
    prompts = {ex_id: e for ex_id, e in tiny["enc"]}
    order = PackedBatches(tiny["enc"], 4, 0)
    tokens = 0
    for responses in drawn:
        picked = next(order).example_ids
        tokens += sum(prompts[i].n_prompt + len(r) for i, r in zip(picked, responses))
        references = [prompts[i].ids[prompts[i].n_prompt:] for i in picked]
        assert responses != references
    assert res.train_tokens == tokens and len(drawn) == 4
    assert all(1 <= len(r) <= 8 for batch in drawn for r in batch)


@pytest.mark.parametrize("sampler", ["imitkd", DISTILLM])
def test_an_on_policy_run_resumes_bit_for_bit(tiny, tmp_path, sampler):
    """4 steps straight against 2 steps, saved, restored into new objects, 2 more: the same
    responses are drawn (distillm: its buffer and schedule come back with the state, and the
    replayed samples are the same) and the same weights come out."""
    torch.manual_seed(0)
    straight = fresh(tiny)
    whole = sampled(tiny, straight, sampler)
    whole_drawn: list = []
    _, full = _train(tiny, straight, 4, whole, responses=whole_drawn)

    torch.manual_seed(0)
    first = fresh(tiny)
    part = sampled(tiny, first, sampler)
    opt = make_optimizer(first, SPEC, CPU)

    def on_step(st, o):
        if st.step == 2:
            S.save(tmp_path / "state", st, first, o, part)
    _train(tiny, first, 2, part, optimizer=opt, on_step=on_step)

    torch.manual_seed(123)  # whatever the process drew since: the draws are keyed, the state brings the rest back
    second = fresh(tiny)
    resumed = sampled(tiny, second, sampler)
    opt2 = make_optimizer(second, SPEC, CPU)
    restored, meta = S.load(tmp_path / "state", second, opt2, resumed)
    assert restored.step == 2 and meta["batches"]["sampler_step"] == 2
    rest_drawn: list = []
    _, rest = _train(tiny, second, 4, resumed, state=restored, optimizer=opt2, responses=rest_drawn)
    assert rest_drawn == whole_drawn[2:] and all(rest_drawn)
    assert [loss for _, loss in rest] == [loss for _, loss in full[2:]]
    for (k, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    if sampler == DISTILLM:
        assert whole.replay_steps >= 1 and resumed.replay_steps >= 1  # the restored buffer was replayed from
        assert resumed.state_dict() == whole.state_dict()


def test_the_teacher_cache_refuses_on_policy_sequences(tiny, tmp_path, monkeypatch):
    """The cache holds the teacher's states of the suite's own sequences: a sampled response
    is not one of them, whether it comes under a fresh id or under the prompt's own id."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    entry, _ = teacher_cache.get_or_build("seams", {"test": "seams"}, tiny["teacher"], tiny["enc"], CPU,
                                          progress=False, log=lambda *_: None)
    cached = CachedTeacher(entry)
    torch.manual_seed(0)
    batch = next(sampled(tiny, fresh(tiny)))
    with pytest.raises(KeyError, match="is not in teacher cache"):
        cached.hidden(batch)
    same_ids = dataclasses.replace(batch, example_ids=[i.split("@")[0] for i in batch.example_ids])
    with pytest.raises(ValueError, match="other tokens .* need a live teacher"):
        cached.hidden(same_ids)
