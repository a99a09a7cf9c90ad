"""kdbench.evaluation.protocol.evaluate_model goes batch of prompts by batch: the model's decodes of a
batch first, its prompt cache dropped, then the teacher's prompt cache of that batch scores
them. The same samples, scores and metrics as decoding and scoring seed by seed over the whole
task, with one prompt cache held at a time (tiny random Llamas, real tokenizer)."""

from __future__ import annotations

import statistics
import weakref

import pytest
import torch

try:
    from tests.tiny_models import tiny_eval_setup
except ImportError:  # run from inside tests/
    from tiny_models import tiny_eval_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_eval_setup(tmp_path_factory.mktemp("evaluate_order"))


def seed_by_seed(student, teacher, tok, inputs, task, spec, dev):
    """The order evaluate_model had before: decode a seed, let the teacher score it, next seed;
    the reference KL at the end from both prompt caches."""
    from kdbench.evaluation.decoder import Decoder, decode_texts
    from kdbench.evaluation.protocol import reference_kl
    from kdbench.evaluation.scoring import score_decode

    dec = Decoder(student, inputs.prompt_ids, spec, dev, pad_id=tok.pad_token_id, keys=inputs.keys)
    scorer = Decoder(teacher, inputs.prompt_ids, spec, dev, pad_id=tok.pad_token_id)
    samples, means = [], {}
    runs = ([(None, True)] if task.greedy else []) + [(s, False) for s in spec.seeds]
    for seed, greedy in runs:
        ids = dec.generate(seed, eos_id=tok.eos_token_id, greedy=greedy, max_new_tokens=task.max_new_tokens)
        outs = decode_texts(tok, ids)
        lps = scorer.logprobs(ids)
        per, mets = score_decode(task, inputs.examples, outs)
        samples += [(seed, o, s["rougeL"], lp) for o, s, lp in zip(outs, per, lps)]
        means[seed] = statistics.fmean(lps)
    kl = reference_kl(student, teacher, inputs.references, dev, [e.id for e in inputs.examples],
                      student_decoder=dec, teacher_decoder=scorer)
    return samples, means, kl


@pytest.mark.parametrize("greedy", [False, True])
def test_the_staged_order_gives_what_seed_by_seed_gave(setup, greedy):
    from kdbench.evaluation.protocol import evaluate_model
    from kdbench.suites import EvalSpec, TaskSpec

    teacher, student, tok, inputs = setup
    dev = torch.device("cpu")
    spec = EvalSpec(seeds=(10, 20, 30), max_new_tokens=6, batch_size=3)
    task = TaskSpec("t", source="test", greedy=greedy, max_new_tokens=6)
    want_samples, want_means, want_kl = seed_by_seed(student, teacher, tok, inputs, task, spec, dev)

    res = evaluate_model(student, teacher=teacher, tokenizer=tok, inputs=inputs, task=task, spec=spec, device=dev)
    def suffixed(sample):  # with a greedy headline, the sampled decode's scores are named *_sampled
        return "_sampled" if greedy and sample["seed"] is not None else ""

    got = [(s["seed"], s["output"], s["scores"]["rougeL" + suffixed(s)], s["scores"]["teacher_logprob" + suffixed(s)])
           for s in res.samples]
    assert got == want_samples  # same order, same texts, same scores, bit for bit
    for seed, mean in want_means.items():
        name = "teacher_logprob_sampled" if greedy and seed is not None else "teacher_logprob"
        assert [v for t, m, v, s in res.metrics if m == name and s == seed] == [mean]
    metric = {m: v for t, m, v, s in res.metrics if s is None}
    # the KL's float64 sums are gathered per batch of prompts here, over the whole task there
    assert (metric["fkl_tok"], metric["rkl_tok"]) == pytest.approx(want_kl, rel=1e-6) and want_kl[0] > 0
    assert len({s for _, _, _, s in res.metrics if s is not None}) == 3


def test_one_prompt_cache_is_held_at_a_time(setup, monkeypatch):
    """Every prefill (the model's or the teacher's, of any batch) finds no other prompt cache
    alive: the model's cache of a batch is gone before the teacher's is made, and each is gone
    before the next batch's; each batch is prefilled once per model."""
    import kdbench.evaluation.decoder as dec
    import kdbench.evaluation.protocol as ev
    from kdbench.suites import EvalSpec, TaskSpec

    teacher, student, tok, inputs = setup
    made: list[tuple[object, weakref.ref]] = []
    alive_at_prefill: list[tuple[str, int]] = []
    real = dec.prefill

    def tracking(model, prompts, **kw):
        who = "teacher" if model is teacher else "student"
        alive_at_prefill.append((who, sum(1 for _, r in made if r() is not None)))
        out = real(model, prompts, **kw)
        made.append((model, weakref.ref(out)))
        return out

    monkeypatch.setattr(dec, "prefill", tracking)
    spec = EvalSpec(seeds=(10, 20), max_new_tokens=4, batch_size=2)
    ev.evaluate_model(student, teacher=teacher, tokenizer=tok, inputs=inputs, task=TaskSpec("t", source="test"),
                      spec=spec, device=torch.device("cpu"))
    # 5 prompts in batches of 2: each model prefills each batch once, the two alternating
    assert [who for who, _ in alive_at_prefill] == ["student", "teacher"] * 3
    assert {alive for _, alive in alive_at_prefill} == {0}
