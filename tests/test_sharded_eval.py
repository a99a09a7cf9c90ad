"""Evaluation on several processes (kdbench/evaluation/protocol.py ``evaluate_model(world=...)``):
two real processes (gloo, CPU, one thread each) decode and score their shares of a task's prompt
chunks (chunk i on rank i mod 2), rank 0 gathers them and scores the task. The samples and
metrics are the one process's, exactly, with every prompt once -- a student sampled over two
seeds plus greedy, and the teacher scoring itself -- on five prompts in chunks of two (three
chunks: the ranks' shares differ in size). The validation score, decoded likewise, is the one
process's on every rank."""

from __future__ import annotations


import pytest
import torch

from kdbench.distributed import SINGLE

try:
    from tests.engine_helpers import run_on_ranks
    from tests.tiny_models import EVAL_PROMPTS, EVAL_REFERENCES, make_tiny_pair
except ImportError:  # run from inside tests/
    from engine_helpers import run_on_ranks
    from tiny_models import EVAL_PROMPTS, EVAL_REFERENCES, make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORLD = 2


def _setup(t_path, s_path):
    from kdbench.data.records import Example
    from kdbench.evaluation.protocol import TaskInputs
    from kdbench.models import load_causal_lm, load_tokenizer

    teacher, student = load_causal_lm(t_path).eval(), load_causal_lm(s_path).eval()
    tok = load_tokenizer(t_path)
    examples = [Example(id=f"t:{i}", prompt=p, references=r, task="t")
                for i, (p, r) in enumerate(zip(EVAL_PROMPTS, EVAL_REFERENCES))]
    return teacher, student, tok, TaskInputs.build(tok, examples, max_prompt_tokens=64, max_tokens=96)


def _evaluate(t_path, s_path, world):
    """{arm: EvalResult (None off rank 0)} for the student and for the teacher as the model."""
    from kdbench.evaluation.protocol import evaluate_model, validation_score
    from kdbench.suites import EvalSpec, TaskSpec

    teacher, student, tok, inputs = _setup(t_path, s_path)
    spec = EvalSpec(seeds=(10, 20), max_new_tokens=6, batch_size=2)
    task = TaskSpec("t", source="test", greedy=True, max_new_tokens=6)
    cpu = torch.device("cpu")
    with torch.no_grad():
        return {"student": evaluate_model(student, teacher=teacher, tokenizer=tok, inputs=inputs, task=task,
                                          spec=spec, device=cpu, world=world),
                "teacher": evaluate_model(teacher, teacher=teacher, tokenizer=tok, inputs=inputs, task=task,
                                          spec=spec, device=cpu, is_teacher=True, world=world),
                # the checkpoint-selection score, sampled and greedy: the same on every rank
                "valid": [validation_score(student, tok, inputs, spec, cpu, task=TaskSpec("t", source="test", greedy=g,
                                                                                          max_new_tokens=6), world=world)
                          for g in (False, True)]}


def _rank(rank: int, t_path, s_path) -> dict:
    from kdbench.distributed import World

    res = _evaluate(t_path, s_path, World(rank, WORLD, rank))
    return {k: v if k == "valid" or v is None else (v.metrics, v.samples) for k, v in res.items()}


@pytest.mark.slow
def test_two_ranks_evaluate_what_one_process_evaluates(tmp_path):
    t_path, s_path = make_tiny_pair(tmp_path / "models")
    two, other = run_on_ranks(_rank, tmp_path, (t_path, s_path), world=WORLD, timeout=300)
    one = {k: v if k == "valid" else (v.metrics, v.samples) for k, v in _evaluate(t_path, s_path, SINGLE).items()}
    assert other["student"] is None and other["teacher"] is None  # only rank 0 holds the result
    assert two["valid"] == other["valid"] == one["valid"]  # every rank the one process's score
    for arm in ("student", "teacher"):
        metrics, samples = two[arm]
        assert metrics == one[arm][0] and samples == one[arm][1], arm  # exactly, in the same order
        # every prompt once per decode (greedy and 2 seeds): 5 x 3 samples, no duplicate, none missing
        keys = [(s["prompt_id"], s["seed"]) for s in samples]
        assert len(keys) == len(set(keys)) == 5 * 3
        assert {p for p, _ in keys} == {f"t:{i}" for i in range(5)}
