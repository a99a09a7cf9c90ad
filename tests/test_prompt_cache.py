"""The teacher's prompt prefill on disk (kdbench/evaluation/prompt_cache.py), one file per batch of
prompts: a loaded prefix is the computed one bit for bit (decodes, scores and whole evaluations
equal), the key follows every input, an incomplete or older-format entry is never read, a cache
it cannot store is used live,
`kdbench cache list|clear` show and remove entries, and two processes asking for one entry at
once compute it once (tiny random Llamas, real tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

try:
    from tests.tiny_models import tiny_eval_setup
except ImportError:  # run from inside tests/
    from tiny_models import tiny_eval_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_eval_setup(tmp_path_factory.mktemp("prompt_cache"))


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entry_for(inputs, batch_size=2, teacher_identity=None):
    from kdbench.evaluation import prompt_cache

    key_inputs = prompt_cache.key_inputs(teacher_identity or {"weights": "w", "tokenizer": "t"}, inputs.prompt_ids,
                                         batch_size, CPU, torch.float32)
    return prompt_cache.PromptCache(prompt_cache.entry_key(key_inputs), key_inputs)


def test_a_loaded_prefix_is_the_computed_one_bit_for_bit(setup, cache_home):
    from kdbench.evaluation.decoder import Decoder
    from kdbench.suites import EvalSpec

    teacher, _, tok, inputs = setup
    spec = EvalSpec(seeds=(1,), max_new_tokens=8, batch_size=2)
    entry = entry_for(inputs)
    live = Decoder(teacher, inputs.prompt_ids, spec, CPU, pad_id=tok.pad_token_id)
    first = Decoder(teacher, inputs.prompt_ids, spec, CPU, pad_id=tok.pad_token_id, stored=entry)
    assert not entry.path.exists()
    first.prefix(1)  # the first request builds every batch's file and publishes the entry
    assert (entry.path / "meta.json").is_file()
    assert sorted(f.name for f in entry.path.glob("*.pt")) == ["batch-00000.pt", "batch-00001.pt", "batch-00002.pt"]
    calls = []
    loaded_decoder = Decoder(teacher, inputs.prompt_ids, spec, CPU, pad_id=tok.pad_token_id, stored=entry)
    loaded_decoder._prefill = lambda i: calls.append(i)  # must not run: the entry is published
    computed = [live.prefix(i) for i in range(len(live.chunks))]
    loaded = [loaded_decoder.prefix(i) for i in range(len(loaded_decoder.chunks))]
    assert calls == [] and len(loaded) == len(computed) == 3
    for a, b in zip(computed, loaded):
        assert torch.equal(a.last_hidden, b.last_hidden) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.next_pos, b.next_pos)
        for la, lb in zip(a.cache.layers, b.cache.layers):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    eos = tok.eos_token_id
    for greedy in (False, True):
        want = live.generate(3, eos_id=eos, greedy=greedy)
        assert loaded_decoder.generate(3, eos_id=eos, greedy=greedy) == want
    want_lp = live.logprobs(want)
    assert loaded_decoder.logprobs(want) == want_lp  # floats equal, not close


def test_an_evaluation_through_the_stored_prefill_equals_the_live_one(setup, cache_home):
    from kdbench.evaluation.protocol import evaluate_model
    from kdbench.suites import EvalSpec, TaskSpec

    teacher, student, tok, inputs = setup
    spec = EvalSpec(seeds=(10, 20), max_new_tokens=6, batch_size=2)
    task = TaskSpec("t", source="test", max_new_tokens=6)
    entry = entry_for(inputs)

    def run(**kw):
        res = evaluate_model(student, teacher=teacher, tokenizer=tok, inputs=inputs, task=task, spec=spec, device=CPU, **kw)
        return res.metrics, res.samples

    live = run()
    assert run(teacher_prompts=entry) == live  # computes and publishes
    assert entry.path.is_dir()
    assert run(teacher_prompts=entry) == live  # loads
    # the teacher's own reference evaluation decodes from the same stored prefill
    teacher_live = evaluate_model(teacher, teacher=teacher, tokenizer=tok, inputs=inputs, task=task, spec=spec,
                                  device=CPU, is_teacher=True)
    teacher_stored = evaluate_model(teacher, teacher=teacher, tokenizer=tok, inputs=inputs, task=task, spec=spec,
                                    device=CPU, is_teacher=True, teacher_prompts=entry)
    assert (teacher_stored.metrics, teacher_stored.samples) == (teacher_live.metrics, teacher_live.samples)


def test_the_key_follows_every_input(setup):
    from kdbench.evaluation import prompt_cache

    inputs = setup[3]
    base = dict(teacher_identity={"weights": "w", "tokenizer": "t"}, prompt_ids=inputs.prompt_ids, batch_size=2,
                device=CPU, dtype=torch.float32)
    key = prompt_cache.entry_key(prompt_cache.key_inputs(**base))
    changed = [dict(base, teacher_identity={"weights": "w2", "tokenizer": "t"}),
               dict(base, teacher_identity={"weights": "w", "tokenizer": "t2"}),
               dict(base, prompt_ids=[p + [1] for p in inputs.prompt_ids]),
               dict(base, batch_size=3), dict(base, dtype=torch.bfloat16), dict(base, device=torch.device("meta"))]
    keys = {prompt_cache.entry_key(prompt_cache.key_inputs(**c)) for c in changed}
    assert key not in keys and len(keys) == len(changed)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        assert prompt_cache.entry_key(prompt_cache.key_inputs(**base)) != key  # threads can change the rounding
    finally:
        torch.set_num_threads(before)
    assert prompt_cache.entry_key(prompt_cache.key_inputs(**base)) == key


def test_the_key_does_not_follow_the_teacher_caches_format(setup, monkeypatch):
    from kdbench.engine import teacher_cache
    from kdbench.evaluation import prompt_cache

    inputs = prompt_cache.key_inputs({"weights": "w", "tokenizer": "t"}, setup[3].prompt_ids, 2, CPU, torch.float32)
    key = prompt_cache.entry_key(inputs)
    monkeypatch.setattr(teacher_cache, "CACHE_FORMAT", teacher_cache.CACHE_FORMAT + 1)
    assert prompt_cache.entry_key(inputs) == key
    monkeypatch.setattr(prompt_cache, "FORMAT", prompt_cache.FORMAT + 1)
    assert prompt_cache.entry_key(inputs) != key


def test_an_incomplete_or_foreign_entry_is_never_read(setup, cache_home):
    from kdbench.evaluation import prompt_cache
    from kdbench.evaluation.decoder import Decoder
    from kdbench.suites import EvalSpec

    teacher, _, tok, inputs = setup
    spec = EvalSpec(seeds=(1,), max_new_tokens=4, batch_size=2)
    entry = entry_for(inputs)
    Decoder(teacher, inputs.prompt_ids, spec, CPU, pad_id=tok.pad_token_id, stored=entry).prefix(0)
    meta = json.loads((entry.path / "meta.json").read_text())
    (entry.path / "meta.json").unlink()  # as if the writer died before publishing
    assert prompt_cache._load(entry.path, 0, CPU) is None
    (entry.path / "meta.json").write_text(json.dumps({**meta, "format": prompt_cache.FORMAT + 1}))
    assert prompt_cache._load(entry.path, 0, CPU) is None
    (entry.path / "meta.json").write_text(json.dumps(meta))
    assert prompt_cache._load(entry.path, 3, CPU) is None  # a batch the entry does not have
    (entry.path / "batch-00001.pt").unlink()
    assert prompt_cache._load(entry.path, 1, CPU) is None and prompt_cache._load(entry.path, 0, CPU) is not None
    (entry.path / "meta.json").write_text(json.dumps({**meta, "format": prompt_cache.FORMAT + 1}))
    # a decoder facing the broken entry computes every batch and publishes a good entry in its place
    calls = []
    dec = Decoder(teacher, inputs.prompt_ids, spec, CPU, pad_id=tok.pad_token_id, stored=entry)
    live = dec._prefill
    dec._prefill = lambda i: calls.append(i) or live(i)
    dec.prefix(0)
    assert calls == [0, 1, 2] and all(prompt_cache._load(entry.path, i, CPU) is not None for i in range(3))


def test_an_older_format_entry_is_listed_but_never_read(setup, cache_home):
    """Format 1 held a task's batches in one prefix.pt: such an entry stays visible to
    `kdbench cache list` / `clear`, but no request reads it (its key differs, and a format-1
    meta at the current key is refused): the entry is built anew."""
    from kdbench.evaluation import prompt_cache
    from kdbench.evaluation.decoder import Decoder
    from kdbench.suites import EvalSpec

    teacher, _, tok, inputs = setup
    spec = EvalSpec(seeds=(1,), max_new_tokens=4, batch_size=2)
    entry = entry_for(inputs)
    old_key = "0123456789abcdef0123456789abcdef"
    for key in (old_key, entry.key):  # an old entry under its own key, and one squatting the current key
        folder = prompt_cache.cache_root() / key
        folder.mkdir(parents=True)
        torch.save({"0.last_hidden": torch.zeros(1, 4)}, folder / "prefix.pt")
        (folder / "meta.json").write_text(json.dumps({"key": key, "format": 1, "inputs": entry.inputs,
                                                      "batches": 3, "layers": 2}))
    assert {e.key for e in prompt_cache.list_entries()} == {old_key, entry.key}
    assert prompt_cache._load(entry.path, 0, CPU) is None
    calls = []
    dec = Decoder(teacher, inputs.prompt_ids, spec, CPU, pad_id=tok.pad_token_id, stored=entry)
    live = dec._prefill
    dec._prefill = lambda i: calls.append(i) or live(i)
    dec.prefix(2)
    assert calls == [0, 1, 2] and not (entry.path / "prefix.pt").exists()
    assert json.loads((entry.path / "meta.json").read_text())["format"] == prompt_cache.FORMAT == 2
    assert (prompt_cache.cache_root() / old_key / "prefix.pt").is_file()  # left alone: `cache clear` removes it


def test_a_cache_that_cannot_be_stored_is_used_live(setup, cache_home):
    from kdbench.evaluation import prompt_cache
    from kdbench.evaluation.sampling import Prefix

    class SlidingLayer:  # not a DynamicLayer
        keys = values = torch.zeros(1)

    odd = [Prefix(type("Cache", (), {"layers": [SlidingLayer()]})(), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))]
    entry = entry_for(setup[3])
    assert entry.prefix(0, lambda i: odd[i], CPU, batches=1) is odd[0]
    assert entry.prefix(0, lambda i: odd[i], CPU, batches=1) is odd[0]  # known live now: not tried again
    assert not entry.path.exists() and prompt_cache.list_entries() == []


def test_cache_list_and_clear_show_and_remove_prompt_entries(setup, cache_home, capsys):
    from kdbench.cli import main
    from kdbench.evaluation.decoder import Decoder
    from kdbench.suites import EvalSpec

    teacher, _, tok, inputs = setup
    entry = entry_for(inputs)
    Decoder(teacher, inputs.prompt_ids, EvalSpec(batch_size=2), CPU, pad_id=tok.pad_token_id, stored=entry).prefix(0)
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "teacher prompt cache in" in out and entry.key in out and "3 batches of prompts" in out
    assert main(["cache", "clear", entry.key[:8]]) == 0
    assert f"removed {entry.key}" in capsys.readouterr().out
    assert not entry.path.exists()


# Each process loads the tiny teacher the parent made, asks the same entry for its prefixes, and
# prints whether it computed them (its prefill ran) or loaded them, then a digest of what it got.
PREFILLER = textwrap.dedent("""
    import hashlib, sys, time, torch
    torch.set_num_threads(1)
    from kdbench.data.records import Example
    from kdbench.evaluation import prompt_cache
    from kdbench.evaluation.decoder import Decoder
    from kdbench.evaluation.protocol import TaskInputs
    from kdbench.models import load_causal_lm, load_tokenizer
    from kdbench.suites import EvalSpec
    from tests.tiny_models import EVAL_PROMPTS, EVAL_REFERENCES
    path = sys.argv[1]
    teacher, tok = load_causal_lm(path).eval(), load_tokenizer(path)
    examples = [Example(id=f"t:{i}", prompt=p, references=r, task="t")
                for i, (p, r) in enumerate(zip(EVAL_PROMPTS, EVAL_REFERENCES))]
    inputs = TaskInputs.build(tok, examples, max_prompt_tokens=64, max_tokens=96)
    key_inputs = prompt_cache.key_inputs({"weights": "w", "tokenizer": "t"}, inputs.prompt_ids, 2,
                                         torch.device("cpu"), torch.float32)
    entry = prompt_cache.PromptCache(prompt_cache.entry_key(key_inputs), key_inputs)
    decoder = Decoder(teacher, inputs.prompt_ids, EvalSpec(seeds=(1,), max_new_tokens=4, batch_size=2),
                      torch.device("cpu"), pad_id=tok.pad_token_id, stored=entry)
    ran = []
    live = decoder._prefill
    # a slow prefill, so that the other process (started with this one) asks while it runs
    decoder._prefill = lambda i: ran.append(i) or (time.sleep(3) if i == 0 else None) or live(i)
    digest = hashlib.sha256()
    for i in range(len(decoder.chunks)):
        p = decoder.prefix(i)
        for t in [p.last_hidden, p.mask, p.next_pos] + [x for l in p.cache.layers for x in (l.keys, l.values)]:
            digest.update(t.float().contiguous().numpy().tobytes())  # bf16 and bool exact in float32
    print("COMPUTED" if ran else "LOADED", digest.hexdigest())
""")


def test_two_processes_asking_for_one_entry_compute_it_once(setup, cache_home):
    teacher_path = setup[0].config._name_or_path  # the module's tiny teacher folder
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "KDBENCH_CACHE": str(cache_home)}
    procs = [subprocess.Popen([sys.executable, "-c", PREFILLER, str(teacher_path)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    lines = sorted(out.split()[-2:] for out, _ in outs)
    # one computed and published under the lock; the other waited for it and loaded it
    assert [word for word, _ in lines] == ["COMPUTED", "LOADED"]
    assert lines[0][1] == lines[1][1]  # the loaded prefixes are the computed ones, bit for bit
    root = cache_home / "teacher-prompts"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    assert len([p for p in root.iterdir() if (p / "meta.json").is_file()]) == 1


def test_a_loaded_entry_is_stamped_last_used(setup, cache_home):
    from kdbench.diskcache import USED

    teacher, _, tok, inputs = setup
    entry = entry_for(inputs)
    built = [entry.prefix(i, lambda j: _prefill(teacher, inputs, tok, j), CPU, teacher.config, batches=3)
             for i in range(3)]
    assert all(built) and not (entry.path / USED).exists()  # built, published and read back by its builder
    later = entry_for(inputs)  # a later run's request
    later.prefix(0, lambda j: pytest.fail("published: must load"), CPU, teacher.config, batches=3)
    assert (entry.path / USED).exists()


def _prefill(teacher, inputs, tok, i):
    from kdbench.evaluation.decoder import Decoder
    from kdbench.suites import EvalSpec

    return Decoder(teacher, inputs.prompt_ids, EvalSpec(seeds=(1,), max_new_tokens=4, batch_size=2), CPU,
                   pad_id=tok.pad_token_id)._prefill(i)
