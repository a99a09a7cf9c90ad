"""Keyed sampling (kdbench/evaluation/sampling.py): every sampled token is picked by a uniform drawn
for (sampling seed, prompt key, position) by a CPU generator, through the inverse CDF of the
filtered distribution. So samples do not depend on the evaluation batch size, the chunking or
the order of prompts; the draw follows the distribution and never picks a masked token; and a
whole evaluation gives the same samples and metrics at any batch size (tiny random Llamas,
real tokenizer, float32)."""

from __future__ import annotations

import pytest
import torch

try:
    from tests.tiny_models import EVAL_PROMPTS, EVAL_REFERENCES, make_tiny_pair, tiny_eval_setup
except ImportError:  # run from inside tests/
    from tiny_models import EVAL_PROMPTS, EVAL_REFERENCES, make_tiny_pair, tiny_eval_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kdbench.models import load_causal_lm

    teacher, _ = make_tiny_pair(tmp_path_factory.mktemp("eval_sampling"))
    return load_causal_lm(teacher).eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (n,), generator=gen).tolist()
    return [torch.randint(3, 5000, (k,), generator=gen).tolist() for k in lengths]


# ---------------------------------------------------------------------------- the samples


def test_samples_do_not_depend_on_the_evaluation_batch_size(float32_cpu, model):
    """45 prompts of 2-13 tokens (so every batch size pads differently), one seed: batch sizes 1,
    7, 32 and 130 (one batch holding all) give the same token ids, and so does the sampler an
    on-policy trainer calls (``decode``), and the prompts in reverse order."""
    from kdbench.evaluation.decoder import Decoder
    from kdbench.evaluation.sampling import decode
    from kdbench.suites import EvalSpec

    prompts = _prompts(45)
    keys = [f"task:{i}" for i in range(len(prompts))]
    got = {}
    for size in (1, 7, 32, 130):
        spec = EvalSpec(max_new_tokens=6, batch_size=size)
        got[size] = Decoder(model, prompts, spec, CPU, pad_id=2, keys=keys).generate(7, eos_id=0)
    assert got[1] == got[7] == got[32] == got[130]
    assert all(len(r) == 6 for r in got[1])  # a random model rarely ends a turn: every position drawn
    assert decode(model, prompts, max_new_tokens=6, eos_id=0, pad_id=2, seed=7, keys=keys, batch_size=9) == got[1]
    backwards = Decoder(model, prompts[::-1], EvalSpec(max_new_tokens=6, batch_size=7), CPU, pad_id=2,
                        keys=keys[::-1]).generate(7, eos_id=0)
    assert backwards[::-1] == got[1]
    # another seed, or other keys for the same prompts, draw other samples
    assert Decoder(model, prompts, EvalSpec(max_new_tokens=6, batch_size=7), CPU, pad_id=2,
                   keys=keys).generate(8, eos_id=0) != got[1]
    other_keys = [f"other:{i}" for i in range(len(prompts))]
    assert decode(model, prompts, max_new_tokens=6, eos_id=0, pad_id=2, seed=7, keys=other_keys) != got[1]


def test_a_prompt_without_an_id_is_keyed_by_its_tokens(model):
    from kdbench.evaluation.decoder import generate_ids
    from kdbench.evaluation.sampling import prompt_key
    from kdbench.suites import EvalSpec

    prompts = _prompts(6, seed=1)
    spec = EvalSpec(max_new_tokens=4, batch_size=4)
    plain = generate_ids(model, prompts, spec, 3, CPU, eos_id=0, pad_id=2)
    assert plain == generate_ids(model, prompts, spec, 3, CPU, eos_id=0, pad_id=2,
                                 keys=[prompt_key(p) for p in prompts])
    assert prompt_key(prompts[0]) == prompt_key(list(prompts[0])) != prompt_key(prompts[0] + [1])


def test_uniforms_are_keyed_and_a_positions_uniform_does_not_depend_on_how_many_are_drawn():
    from kdbench.evaluation.sampling import draw_uniforms

    keys = ["a", "b", "c"]
    long = draw_uniforms(5, keys, 300)
    assert long.dtype == torch.float32 and long.device.type == "cpu" and long.shape == (3, 300)
    assert torch.equal(draw_uniforms(5, keys, 7), long[:, :7])
    assert torch.equal(draw_uniforms(5, ["c"], 300)[0], long[2])  # a row is its key's alone
    assert not torch.equal(draw_uniforms(6, keys, 300), long)
    assert ((long >= 0) & (long < 1)).all()
    torch.manual_seed(0)
    again = draw_uniforms(5, keys, 300)
    torch.manual_seed(1)  # the global generator plays no part
    assert torch.equal(again, draw_uniforms(5, keys, 300)) and torch.equal(again, long)


def test_a_sampled_decode_needs_its_uniforms(model):
    from kdbench.evaluation.sampling import decode_from, prefill

    with pytest.raises(ValueError, match="needs uniforms"):
        decode_from(model, prefill(model, _prompts(2), pad_id=2), max_new_tokens=3, eos_id=0)


# ---------------------------------------------------------------------------- the draw


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _draws(logits: torch.Tensor, n: int, seed: int = 3) -> torch.Tensor:
    from kdbench.evaluation.sampling import draw_uniforms, pick_tokens

    u = draw_uniforms(seed, [f"prompt-{i}" for i in range(n)], 1)[:, 0]
    return pick_tokens(logits.expand(n, -1), u)


LOGITS = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.07, 0.03]]).log()
CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def test_the_inverse_cdf_draw_follows_the_distribution():
    """20,000 draws, each its own key, against the probabilities: chi-square with 5 degrees of
    freedom below the 0.1 % critical value (fixed seed: the statistic is a fixed number)."""
    n = 20_000
    tok = _draws(LOGITS, n)
    counts = torch.bincount(tok, minlength=6).double()
    assert _chi_square(counts, LOGITS.softmax(-1)[0].double()) < CHI2_DF5_P001
    # and not by accident: a wrong distribution is rejected by the same statistic
    assert _chi_square(counts, torch.full((6,), 1 / 6, dtype=torch.float64)) > 100 * CHI2_DF5_P001


@pytest.mark.parametrize("top_k,top_p,kept", [(3, 1.0, 3), (0, 0.7, 3), (2, 0.5, 1), (4, 0.9, 4)])
def test_the_draw_never_picks_a_token_top_k_or_top_p_masked(top_k, top_p, kept):
    """Over a shuffled vocabulary (so the kept tokens are not a prefix of the CDF), the draws
    stay in the kept set and follow its renormalised probabilities."""
    from kdbench.evaluation.sampling import _filter

    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    logits = LOGITS[:, perm]
    filtered = _filter(logits, 1.0, top_k, top_p)
    allowed = torch.isfinite(filtered[0])
    assert int(allowed.sum()) == kept
    tok = _draws(filtered, 8_000, seed=11)
    assert allowed[tok].all()
    counts = torch.bincount(tok, minlength=6).double()
    probs = filtered.softmax(-1)[0].double()
    assert _chi_square(counts, probs) < 20.515  # at most 5 degrees of freedom: conservative


def test_the_top_end_of_the_cdf_never_falls_on_a_masked_token():
    """u × total may round up to the total, which no cumulative weight exceeds: the pick is then
    the last token with weight, not past the vocabulary and not a masked token after it."""
    from kdbench.evaluation.sampling import pick_tokens

    inf = float("-inf")
    logits = torch.tensor([[inf, 1.0, inf, 2.0, 0.5, inf, inf],
                           [0.0, 0.0, 0.0, inf, inf, inf, inf],
                           [inf, inf, inf, inf, inf, inf, 3.0]])
    for u in (0.0, 0.3, 0.999, 1.0 - 2**-24, 1.0):
        tok = pick_tokens(logits, torch.full((3,), u))
        assert torch.isfinite(logits.gather(1, tok[:, None])).all(), u
    assert pick_tokens(logits, torch.ones(3)).tolist() == [4, 2, 6]  # the last weighted token of each row
    assert pick_tokens(logits, torch.zeros(3)).tolist() == [1, 0, 6]  # the first weighted token
    grid = torch.linspace(0, 1, 1001)
    tok = pick_tokens(logits[:1].expand(1001, -1), grid)
    assert set(tok.tolist()) == {1, 3, 4} and tok.diff().ge(0).all()  # monotone in u: an inverse CDF


# ---------------------------------------------------------------------------- a whole evaluation


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_eval_setup(tmp_path_factory.mktemp("eval_sampling_eval"))


def _inputs(tok, n: int = 13):
    from kdbench.data.records import Example
    from kdbench.evaluation.protocol import TaskInputs

    examples = [Example(id=f"t:{i}", prompt=f"{EVAL_PROMPTS[i % 5]} ({i})", references=EVAL_REFERENCES[i % 5],
                        task="t") for i in range(n)]
    return TaskInputs.build(tok, examples, max_prompt_tokens=64, max_tokens=96)


@pytest.mark.parametrize("greedy", [False, True])
def test_an_evaluation_is_the_same_at_batch_sizes_3_and_8(float32_cpu, setup, greedy):
    """13 prompts (5 batches of 3, 2 of 8): the same samples, scores and metrics. Texts, ROUGE-L,
    lengths and diversity are equal; the teacher's log-likelihoods and the reference KL come from
    prompt caches padded differently, so they agree to float32 rounding."""
    from kdbench.evaluation.protocol import evaluate_model
    from kdbench.suites import EvalSpec, TaskSpec

    teacher, student, tok, _ = setup
    inputs = _inputs(tok)
    task = TaskSpec("t", source="test", greedy=greedy, max_new_tokens=6)
    runs = {size: evaluate_model(student, teacher=teacher, tokenizer=tok, inputs=inputs, task=task,
                                 spec=EvalSpec(seeds=(10, 20), max_new_tokens=6, batch_size=size), device=CPU)
            for size in (3, 8)}
    a, b = runs[3], runs[8]
    assert [(s["prompt_id"], s["seed"], s["output"]) for s in a.samples] == \
           [(s["prompt_id"], s["seed"], s["output"]) for s in b.samples]
    assert len(a.samples) == 13 * (2 + greedy)
    for sa, sb in zip(a.samples, b.samples):
        assert sa["scores"].keys() == sb["scores"].keys()
        for k, v in sa["scores"].items():
            assert (v == sb["scores"][k]) if "teacher_logprob" not in k else v == pytest.approx(sb["scores"][k],
                                                                                                rel=1e-4, abs=1e-5)
    assert [m[:2] + m[3:] for m in a.metrics] == [m[:2] + m[3:] for m in b.metrics]
    for (task_a, name, va, _), (_, _, vb, _) in zip(a.metrics, b.metrics):
        float_rounded = name.startswith("teacher_logprob") or name in ("fkl_tok", "rkl_tok")
        assert va == pytest.approx(vb, rel=1e-4, abs=1e-5) if float_rounded else va == vb, name
