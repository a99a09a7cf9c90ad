"""kdbench.evaluation.sampling.decode: the evaluator's decoder against transformers' generate, and its
protocol knobs (temperature, top-k, top-p), on a tiny random Llama with the real tokenizer."""

from __future__ import annotations

import pytest
import torch

from kdbench.evaluation.sampling import _filter, decode

try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kdbench.models import load_causal_lm

    teacher, _ = make_tiny_pair(tmp_path_factory.mktemp("sampling"))
    return load_causal_lm(teacher).eval()


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]


def test_greedy_equals_transformers_generate_row_by_row(model):
    ours = decode(model, PROMPTS, max_new_tokens=6, eos_id=0, pad_id=2, greedy=True)
    for p, got in zip(PROMPTS, ours):  # one prompt at a time: no padding on the reference side
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=6, eos_token_id=0, pad_token_id=2)[0, len(p):].tolist()
        assert got == ref


def test_a_finished_row_leaves_the_batch_and_the_others_continue_unchanged(model):
    alone = decode(model, [PROMPTS[0]], max_new_tokens=6, eos_id=-1, pad_id=2, greedy=True)[0]
    eos = alone[1]  # make the second token of this row an end-of-turn: the row stops there
    both = decode(model, [PROMPTS[0], PROMPTS[2]], max_new_tokens=6, eos_id=eos, pad_id=2, greedy=True)
    assert both[0] == alone[: alone.index(eos) + 1]
    other = decode(model, [PROMPTS[2]], max_new_tokens=6, eos_id=eos, pad_id=2, greedy=True)[0]
    assert both[1] == other  # the row left in the batch is decoded as if alone


def test_sampling_is_seeded_and_every_response_is_cut_after_eos(model):
    a = decode(model, PROMPTS, max_new_tokens=8, eos_id=5, pad_id=2, seed=10)
    torch.manual_seed(123)  # the global generator plays no part: draws are keyed by seed and prompt
    b = decode(model, PROMPTS, max_new_tokens=8, eos_id=5, pad_id=2, seed=10)
    assert a == b and all(1 <= len(r) <= 8 for r in a)
    assert all(5 not in r[:-1] for r in a)
    assert decode(model, PROMPTS, max_new_tokens=8, eos_id=5, pad_id=2, seed=11) != a
    with pytest.raises(ValueError, match="needs a seed"):
        decode(model, PROMPTS, max_new_tokens=8, eos_id=5, pad_id=2)


def test_protocol_knobs_match_their_definitions():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.equal(_filter(logits, 1.0, 0, 1.0), logits)  # the paper's protocol changes nothing
    assert torch.allclose(_filter(logits, 2.0, 0, 1.0), logits / 2)
    k2 = _filter(logits, 1.0, 2, 1.0)
    assert torch.isinf(k2[0, 2:]).all() and torch.equal(k2[0, :2], logits[0, :2])
    p = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    top = _filter(logits, 1.0, 0, 0.8)  # the smallest top set with mass >= 0.8: the first two
    assert torch.isfinite(top[0, :2]).all() and torch.isinf(top[0, 2:]).all() and p[:2].sum() >= 0.8 > p[0]


def test_scoring_with_the_prompt_cache_equals_scoring_packed_sequences(float32_cpu, model):
    """The evaluator scores responses given the prompts' cache; the packed path scores whole
    sequences: the same log-likelihoods."""
    from kdbench.evaluation.decoder import Decoder
    from kdbench.suites import EvalSpec

    spec = EvalSpec(batch_size=2, max_new_tokens=5)
    dec = Decoder(model, PROMPTS, spec, torch.device("cpu"), pad_id=2)
    responses = dec.generate(10, eos_id=7)
    responses = [r[:k] for r, k in zip(responses, (5, 2, 1))]  # ragged: right padding and a lone first token
    cached = dec.logprobs(responses)
    whole = []  # each sequence alone through the model's own logits
    for p, r in zip(PROMPTS, responses):
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p + r])).logits[0].float().log_softmax(-1)
        whole.append(float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(r))) / len(r))
    assert cached == pytest.approx(whole, abs=1e-4)
    # a decoder's calls consume nothing: a second seed decodes as a fresh decoder would
    again = Decoder(model, PROMPTS, spec, torch.device("cpu"), pad_id=2).generate(20, eos_id=7)
    assert dec.logprobs(responses) == cached
    assert dec.generate(20, eos_id=7) == again


def test_reference_kl_from_the_cached_teacher_equals_the_live_teacher(model, tmp_path, monkeypatch):
    from kdbench.data.batching import Encoded
    from kdbench.engine import teacher_cache
    from kdbench.engine.teacher import CachedTeacher
    from kdbench.evaluation.protocol import reference_kl

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path))
    refs = [Encoded(p + [11, 12, 13], len(p)) for p in PROMPTS]
    ids = ["a", "b", "c"]
    entry, _ = teacher_cache.get_or_build("refs", {"test": 1}, model, list(zip(ids, refs)), torch.device("cpu"),
                                          progress=False, log=lambda *_: None)
    student = model  # any model: the teacher side is what is cached
    live = reference_kl(student, model, refs, torch.device("cpu"), ids)
    cached = reference_kl(student, CachedTeacher(entry), refs, torch.device("cpu"), ids)
    assert cached == pytest.approx(live, abs=1e-5) and live == pytest.approx((0.0, 0.0), abs=1e-5)


def test_length_groups_cover_every_row_once_and_bound_the_padding():
    from kdbench.evaluation.sampling import length_groups

    lengths = [1, 32, 5, 5, 17, 30, 2, 9, 31, 12, 3, 28, 8, 1, 16, 20, 4, 32, 6, 7]
    groups = length_groups(lengths, min_rows=3, ratio=0.75)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = lengths[g[0]]
        assert longest == max(lengths[i] for i in g)
        # a row below ratio × longest joins only while the group is still short of min_rows
        assert all(lengths[i] >= 0.75 * longest for i in g[3:])
    padded = sum(len(g) * lengths[g[0]] for g in groups)
    assert padded < len(lengths) * max(lengths) * 0.75  # well below one right-padded batch


def test_continuation_hidden_in_length_groups_equals_each_sequence_alone(model):
    """Many ragged continuations (so several length groups, one of length 1) through the
    prompt cache: each row equals the hidden state of the sequence run alone."""
    from kdbench.evaluation.sampling import continuation_hidden, prefill

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (int(n),), generator=gen).tolist() for n in torch.randint(2, 9, (18,), generator=gen)]
    conts = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in [1, 2, 3, 9, 12, 4, 7, 1, 15, 6, 5, 10, 2, 8, 11, 13, 3, 14]]
    pre = prefill(model, prompts, pad_id=2)
    got = continuation_hidden(model, pre, conts, pad_id=2)
    for p, c, h in zip(prompts, conts, got):
        with torch.no_grad():
            alone = model.base_model(input_ids=torch.tensor([p + c])).last_hidden_state[0]
        assert h.shape == (len(c), alone.shape[-1])
        torch.testing.assert_close(h, alone[len(p) - 1: len(p) - 1 + len(c)], atol=1e-4, rtol=1e-4)
    # the prefix is not consumed: a second call gives the same rows
    again = continuation_hidden(model, pre, conts, pad_id=2)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_reference_kl_through_the_prompt_caches_equals_packed_sequences(float32_cpu, model, tmp_path):
    """The evaluator computes the reference KL from the decoders' prompt caches; packed whole
    sequences give the same value (the student is the teacher with a perturbed head, so the
    KL is not zero)."""
    import copy

    from kdbench.data.batching import Encoded
    from kdbench.evaluation.decoder import Decoder
    from kdbench.evaluation.protocol import reference_kl
    from kdbench.suites import EvalSpec

    student = copy.deepcopy(model)
    with torch.no_grad():
        student.get_output_embeddings().weight.mul_(1.5)
    refs = [Encoded(p + r, len(p)) for p, r in zip(PROMPTS, [[11, 12, 13], [14], [15, 16, 17, 18, 19]])]
    spec = EvalSpec(batch_size=2)
    dev = torch.device("cpu")
    packed = reference_kl(student, model, refs, dev)
    cached = reference_kl(student, model, refs, dev, student_decoder=Decoder(student, PROMPTS, spec, dev, pad_id=2),
                          teacher_decoder=Decoder(model, PROMPTS, spec, dev, pad_id=2))
    assert packed[0] > 1e-3 and packed[1] > 1e-3
    assert cached == pytest.approx(packed, rel=1e-4)
    # a decoder over other prompts is not used (the packed path answers)
    other = Decoder(student, [PROMPTS[0]], spec, dev, pad_id=2)
    assert reference_kl(student, model, refs, dev, student_decoder=other) == pytest.approx(packed, rel=1e-6)


def test_an_empty_continuation_has_no_rows_and_no_log_likelihood(model):
    import math

    from kdbench.evaluation.sampling import continuation_hidden, continuation_logprobs, prefill

    pre = prefill(model, PROMPTS, pad_id=2)
    conts = [[], [14, 15], [16]]
    rows = continuation_hidden(model, pre, conts, pad_id=2)
    assert [r.shape[0] for r in rows] == [0, 2, 1]
    lp = continuation_logprobs(model, pre, conts, pad_id=2)
    assert math.isnan(lp[0]) and all(math.isfinite(v) for v in lp[1:])
