"""The engine's seams take what comes next without a change to the trainer.

On-policy distillation (responses sampled from the student being trained, scored by the
teacher) is a *batch source* beside the objective: :class:`StudentSampled` below is one, written
against the seams alone — ``next()`` gives a packed :class:`~kdbench.data.batching.Batch`,
``state_dict()`` / ``load_state_dict()`` give its cursor. The tests train through the unchanged
``train()`` with a live teacher, resume such a run bit for bit through the unchanged train state
(the draws are keyed by the run's seed, the example and the draw's number, so a resumed run draws
the same responses from its cursor alone), and check that the teacher cache, which holds the
teacher's states of the suite's own sequences, refuses them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kdbench.data.batching import Encoded, pack
from kdbench.engine import state as S
from kdbench.engine import teacher_cache
from kdbench.engine.batches import PackedBatches
from kdbench.engine.teacher import CachedTeacher, LiveTeacher
from kdbench.engine.trainer import make_optimizer, train
from kdbench.registry import get_objective
from kdbench.evaluation.sampling import decode

try:
    from tests.engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


class StudentSampled:
    """On-policy batches: the prompts of ``examples`` in :class:`PackedBatches`' per-seed order,
    each answered by a response sampled from ``model`` when the batch is drawn (in eval mode:
    transformers' activation checkpointing turns the KV cache off in training mode). Sampling
    is keyed (kdbench/evaluation/sampling.py ``decode``): seed ``seed``, key
    ``"<example id>@draw<n>"``, so the cursor alone says what a resumed source draws."""

    def __init__(self, model, examples, batch_size: int, seed: int, *, eos_id: int, pad_id: int,
                 max_new_tokens: int = 8):
        prompts = [(ex_id, Encoded(e.ids[:e.n_prompt], e.n_prompt)) for ex_id, e in examples]
        self.order = PackedBatches(prompts, batch_size, seed, pad_id)  # the order and its cursor
        self.model, self.eos_id, self.pad_id, self.max_new_tokens = model, eos_id, pad_id, max_new_tokens
        self.seed = seed
        self.drawn = 0
        self.responses: list[list[list[int]]] = []  # what each batch sampled (for the tests)

    def __iter__(self):
        return self

    def __next__(self):
        prompts = next(self.order)
        training = self.model.training
        self.model.eval()
        self.drawn += 1
        # fresh ids: these sequences are new, whatever the prompt's id was; they key the draws too
        ids = [f"{ex_id}@draw{self.drawn}" for ex_id in prompts.example_ids]
        responses = decode(self.model, [e.ids for e in prompts.encoded], max_new_tokens=self.max_new_tokens,
                           eos_id=self.eos_id, pad_id=self.pad_id, seed=self.seed, keys=ids)
        self.model.train(training)
        self.responses.append(responses)
        return pack([Encoded(e.ids + r, e.n_prompt) for e, r in zip(prompts.encoded, responses)], ids, self.pad_id)

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.drawn = int(state["drawn"])


def sampled(tiny, model) -> StudentSampled:
    tok = tiny["tok"]
    return StudentSampled(model, tiny["enc"], 4, 0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)


def _train(tiny, model, steps, batches, on_step=None, **kw):
    points = []
    res = train(model=model, objective=get_objective("rkl"), batches=batches, teacher=LiveTeacher(tiny["teacher"]),
                spec=dataclasses.replace(SPEC, steps=steps), device=CPU,
                hooks=Hooks(log=lambda s, p: points.append((s, p["loss"])), on_step=on_step), progress=False, **kw)
    return res, points


def test_an_on_policy_source_trains_through_the_unchanged_trainer(tiny):
    torch.manual_seed(0)
    model = fresh(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = sampled(tiny, model)
    res, points = _train(tiny, model, 4, source)
    assert [s for s, _ in points] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(loss)) for _, loss in points)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the student's own responses were trained on, not the references: the token count is theirs
    prompts = {ex_id: e for ex_id, e in tiny["enc"]}
    order = PackedBatches(tiny["enc"], 4, 0)
    tokens = 0
    for responses in source.responses:
        picked = next(order).example_ids
        tokens += sum(prompts[i].n_prompt + len(r) for i, r in zip(picked, responses))
        references = [prompts[i].ids[prompts[i].n_prompt:] for i in picked]
        assert responses != references
    assert res.train_tokens == tokens and len(source.responses) == 4
    assert all(1 <= len(r) <= 8 for batch in source.responses for r in batch)


def test_an_on_policy_run_resumes_bit_for_bit(tiny, tmp_path):
    """4 steps straight against 2 steps, saved, restored into new objects, 2 more: the same
    responses are drawn and the same weights come out."""
    torch.manual_seed(0)
    straight = fresh(tiny)
    whole = sampled(tiny, straight)
    _, full = _train(tiny, straight, 4, whole)

    torch.manual_seed(0)
    first = fresh(tiny)
    part = sampled(tiny, first)
    opt = make_optimizer(first, SPEC, CPU)

    def on_step(st, o):
        if st.step == 2:
            S.save(tmp_path / "state", st, first, o, part)
    _train(tiny, first, 2, part, optimizer=opt, on_step=on_step)

    torch.manual_seed(123)  # whatever the process drew since: the draws are keyed, the state brings the rest back
    second = fresh(tiny)
    resumed = sampled(tiny, second)
    opt2 = make_optimizer(second, SPEC, CPU)
    restored, meta = S.load(tmp_path / "state", second, opt2, resumed)
    assert restored.step == 2 and meta["batches"]["drawn"] == 2
    _, rest = _train(tiny, second, 4, resumed, state=restored, optimizer=opt2)
    assert resumed.responses == whole.responses[2:]
    assert [loss for _, loss in rest] == [loss for _, loss in full[2:]]
    for (k, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k


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
