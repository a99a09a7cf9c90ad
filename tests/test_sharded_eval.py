"""Evaluation on several processes (kdbench/evaluation/protocol.py ``evaluate_model(world=...)``):
two real processes (gloo, CPU, one thread each) decode and score their shares of a task's prompt
chunks (chunk i on rank i mod 2), rank 0 gathers them and scores the task. The samples and
metrics are the one process's, exactly, with every prompt once -- a student sampled over two
seeds plus greedy, and the teacher scoring itself -- on five prompts in chunks of two (three
chunks: the ranks' shares differ in size). The validation score, decoded likewise, is the one
process's on every rank."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle

import pytest
import torch

from kdbench.distributed import SINGLE

try:
    from tests.tiny_models import EVAL_PROMPTS, EVAL_REFERENCES, make_tiny_pair
except ImportError:  # run from inside tests/
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


def _rank(rank: int, init_file: str, t_path, s_path, out: str) -> None:
    import torch.distributed as dist

    from kdbench.distributed import World

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        res = _evaluate(t_path, s_path, World(rank, WORLD, rank))
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump({k: v if k == "valid" or v is None else (v.metrics, v.samples) for k, v in res.items()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_evaluate_what_one_process_evaluates(tmp_path):
    t_path, s_path = make_tiny_pair(tmp_path / "models")
    out = tmp_path / "two.pkl"
    ctx = multiprocessing.get_context("spawn")
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), t_path, s_path, str(out)))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert [p.exitcode for p in procs] == [0, 0]
    two, other = (pickle.loads(out.with_name(f"{out.name}.{r}").read_bytes()) for r in range(WORLD))
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
