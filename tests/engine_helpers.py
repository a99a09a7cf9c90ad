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
