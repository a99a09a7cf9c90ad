"""The exact teacher cache (kdbench/engine/teacher_cache.py): cached teacher logits equal the
live teacher's, keys follow every input, a stale or half-written entry is never read, two
processes building one entry build it once, and `kdbench cache list|clear`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdbench import diskcache
from kdbench.engine import teacher_cache
from kdbench.engine.batches import PackedBatches
from kdbench.engine.teacher import CachedTeacher, LiveTeacher, TeacherHead
from kdbench.losses import _logits

try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kdbench.data.batching import encode
    from kdbench.data.micro import build_splits
    from kdbench.models import load_causal_lm, load_tokenizer

    teacher_path, _ = make_tiny_pair(tmp_path_factory.mktemp("cache_models"))
    tok = load_tokenizer(teacher_path)
    examples = [(e.id, encode(tok, e.prompt, e.references[0], 48, 64, "")) for e in build_splits(0.05, 0.12)["train"][:20]]
    return {"path": teacher_path, "teacher": load_causal_lm(teacher_path).eval().requires_grad_(False),
            "examples": examples}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "teacher-hidden"


def _build(tiny, key="k1", inputs=None):
    return teacher_cache.get_or_build(key, inputs or {"test": key}, tiny["teacher"], tiny["examples"],
                                      torch.device("cpu"), progress=False, log=lambda *_: None)


def test_cached_teacher_logits_equal_the_live_teachers(tiny, cache):
    entry, built_s = _build(tiny)
    assert built_s > 0 and entry.meta["n_examples"] == len(tiny["examples"])
    live, cached = LiveTeacher(tiny["teacher"]), CachedTeacher(entry)
    # training batches are other compositions than the build's (16 examples per forward)
    for batch in [next(PackedBatches(tiny["examples"], 4, seed=s)) for s in range(3)]:
        h_live, h_cached = live.hidden(batch), cached.hidden(batch)
        assert h_cached.shape == (batch.n_counted, h_live.shape[1])
        t_live = _logits(h_live, live.head.weight, live.head.bias)
        t_cached = _logits(h_cached, cached.head.weight, cached.head.bias)
        # the tolerance: float32 rounding of different batch shapes (packed attention over other rows)
        torch.testing.assert_close(t_cached, t_live, rtol=1e-5, atol=1e-5)
    assert _build(tiny)[1] == 0.0  # the second request reuses the entry


def test_the_key_follows_every_input_and_a_stale_entry_is_never_read(tiny, cache):
    spec = SimpleNamespace(bf16_autocast=False, max_prompt_tokens=48, max_tokens=64)
    teacher = {"weights": "w0", "tokenizer": "t0"}

    def key_inputs(examples):
        return teacher_cache.key_inputs(teacher, examples, spec, "", torch.device("cpu"))

    base = key_inputs(tiny["examples"])
    changed = [
        {**base, "teacher": {"weights": "w1", "tokenizer": "t0"}},
        {**base, "teacher": {"weights": "w0", "tokenizer": "t1"}},
        key_inputs(tiny["examples"][:-1]),  # the encoded data
        {**base, "max_prompt_tokens": 47}, {**base, "max_tokens": 63}, {**base, "system_prompt": "Be brief."},
        {**base, "dtype": "bfloat16"}, {**base, "device": "cuda"},
    ]
    keys = {teacher_cache.cache_key(x) for x in changed}
    assert teacher_cache.cache_key(base) not in keys and len(keys) == len(changed)
    assert teacher_cache.cache_key(dict(reversed(base.items()))) == teacher_cache.cache_key(base)  # canonical

    entry, _ = _build(tiny, teacher_cache.cache_key(base), base)
    ids = [i for i, _ in tiny["examples"]]
    before = entry.rows(ids).clone()
    assert teacher_cache.lookup(teacher_cache.cache_key(changed[0])) is None  # a changed key: a new entry
    # an entry without meta.json (a build that died before publishing) or with a truncated file is not one
    (entry.path / "meta.json").rename(entry.path / "meta.bak")
    assert teacher_cache.lookup(entry.key) is None
    (entry.path / "meta.bak").rename(entry.path / "meta.json")
    with open(entry.path / "hidden.bin", "r+b") as fh:
        fh.truncate(entry.path.joinpath("hidden.bin").stat().st_size - 2)
    assert teacher_cache.lookup(entry.key) is None
    rebuilt, built_s = _build(tiny, entry.key, base)  # rebuilt in place, complete again
    assert built_s > 0 and teacher_cache.lookup(entry.key) is not None
    assert torch.equal(rebuilt.rows(ids), before)


BUILDER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from kdbench.data.batching import encode
    from kdbench.data.micro import build_splits
    from kdbench.engine import teacher_cache
    from kdbench.models import load_causal_lm, load_tokenizer
    path = sys.argv[1]
    tok = load_tokenizer(path)
    ex = [(e.id, encode(tok, e.prompt, e.references[0], 48, 64, "")) for e in build_splits(0.05, 0.12)["train"][:20]]
    entry, built = teacher_cache.get_or_build("shared", {"test": "shared"}, lambda: load_causal_lm(path).eval(), ex,
                                              torch.device("cpu"), progress=False, log=lambda *_: None)
    print("BUILT" if built > 0 else "REUSED", entry.meta["n_rows"])
""")


def test_two_processes_building_one_entry_build_it_once(tiny, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(tiny["path"])], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    words = sorted(out.split()[0] for out, _ in outs)
    assert words == ["BUILT", "REUSED"]  # one built it under the lock, the other waited and read it
    assert len({out.split()[1] for out, _ in outs}) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    assert teacher_cache.lookup("shared") is not None


def test_a_bf16_exact_head_is_held_in_bf16_and_gives_bitwise_the_same_logits():
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(37, 8, generator=g).bfloat16().float()  # a bf16 teacher's head, stored as float32
    head = TeacherHead(w32)
    assert head.weight.dtype == torch.bfloat16
    h = torch.randn(5, 8, generator=g)
    assert torch.equal(_logits(h, head.weight, None), _logits(h, w32, None))
    not_exact = w32 + 1e-4
    assert TeacherHead(not_exact).weight.dtype == torch.float32  # kept as it is: never rounded


def test_cache_list_and_clear_from_the_command_line(tiny, cache, capsys):
    from kdbench.cli import main

    _build(tiny, "abc123")
    _build(tiny, "def456")
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "abc123" in out and "def456" in out and "positions of 20 examples" in out
    assert main(["cache", "clear", "abc1"]) == 0  # a prefix (4 characters at least) naming one entry
    assert "removed abc123" in capsys.readouterr().out
    assert teacher_cache.lookup("abc123") is None and teacher_cache.lookup("def456") is not None
    assert main(["cache", "clear", "nosuch"]) != 0  # a clear one-line error, nothing removed
    err = capsys.readouterr().err
    assert "no cache entry matches 'nosuch'" in err and "Traceback" not in err
    assert teacher_cache.lookup("def456") is not None
    assert main(["cache", "clear"]) == 2 and teacher_cache.lookup("def456") is not None  # all only when asked
    assert main(["cache", "clear", "--all"]) == 0 and teacher_cache.list_entries() == []


def test_rows_are_refused_for_other_tokens_under_a_cached_id_even_of_the_same_length(tiny, cache):
    """An on-policy sampler's fresh response under an example id the cache knows: the count of
    positions can match, the teacher's states cannot."""
    from kdbench.data.batching import Encoded
    from kdbench.data.batching import pack

    entry, _ = _build(tiny)
    source = CachedTeacher(entry)
    (ex_id, e), *_ = tiny["examples"]
    assert source.hidden(pack([e], [ex_id])).shape[0] == len(e.ids) - e.n_prompt
    ids = list(e.ids)
    ids[e.n_prompt] = (ids[e.n_prompt] + 1) % 49152  # the response's first token changed, same length
    other = pack([Encoded(ids, e.n_prompt)], [ex_id])
    with pytest.raises(ValueError, match=f"other tokens for example {ex_id!r}.*need a live teacher"):
        source.hidden(other)
    with pytest.raises(ValueError, match="other tokens"):  # a moved prompt boundary is another example too
        source.hidden(pack([Encoded(list(e.ids), e.n_prompt + 1)], [ex_id]))


def test_an_entry_of_an_earlier_format_is_listed_and_cleared_never_read(tiny, cache, capsys):
    import json

    from kdbench.cli import main

    entry, _ = _build(tiny, "old1")
    meta = json.loads((entry.path / "meta.json").read_text())
    (entry.path / "meta.json").write_text(json.dumps({**meta, "format": teacher_cache.CACHE_FORMAT - 1}))
    assert teacher_cache.lookup("old1") is None
    assert main(["cache", "list"]) == 0
    assert "old1" in (out := capsys.readouterr().out) and "no longer read" in out
    assert main(["cache", "clear", "old1"]) == 0 and not entry.path.exists()


def test_a_reused_entry_is_stamped_last_used_and_listed_so(tiny, cache, capsys):
    from kdbench.cli import main

    entry, built = _build(tiny, "used1")
    assert built > 0 and entry.last_used == entry.meta["created_at"]  # built, never read yet
    _build(tiny, "used2")
    assert _build(tiny, "used1")[1] == 0.0  # reused: stamped now
    stamp = entry.path / diskcache.USED
    os.utime(stamp, (0, 0))  # as if read in 1970
    assert entry.last_used == "1970-01-01T00:00:00Z"
    _build(tiny, "used1")
    assert entry.last_used > "2026" and not (teacher_cache.lookup("used2").path / diskcache.USED).exists()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert f"last used {entry.last_used}" in out


def test_keys_and_digests_are_the_ones_stored_entries_are_named_by(monkeypatch):
    """Entries on disk are found by their keys: the digests behind them (kdbench/diskcache.py
    ``digest``, the teacher cache's data digest) must not change a digit. The values are the
    ones the caches computed before ``digest`` became the one helper (the prompt cache's under
    its format 1, and the one its format 2 gives)."""
    from kdbench.data.batching import Encoded
    from kdbench.evaluation import prompt_cache

    teacher = {"weights": "w", "tokenizer": "t"}
    assert teacher_cache.cache_key({"teacher": teacher, "data": "d", "max_tokens": 192, "dtype": "float32"}) \
        == "5c1def72c9ecb45a4db40207"
    assert prompt_cache.FORMAT == 2
    assert prompt_cache.entry_key({"teacher": teacher, "prompts": "p", "batch_size": 50, "threads": 2}) \
        == "aa1e73dd66adb9da5cfbd062"
    with monkeypatch.context() as m:
        m.setattr(prompt_cache, "FORMAT", 1)
        assert prompt_cache.entry_key({"teacher": teacher, "prompts": "p", "batch_size": 50, "threads": 2}) \
            == "a8e2621b6856c07ca03de3a9"
    assert diskcache.digest({"b": [1, 2.5, "é"], "a": None}) == "b129e8b869243fd11bf91cf8"
    assert teacher_cache.tokens_digest(Encoded([5, 6, 7, 8], 2)) == "e0b1235f5fa78937"
    assert prompt_cache.prompts_digest([[1, 2, 3], [4]]) \
        == "1ae1ffac8630e40e7edb5101011b64a79b62896da839f3a5e803a911041e4da6"
    assert teacher_cache.data_digest([("x1", Encoded([5, 6, 7], 1)), ("x2", Encoded([9, 10], 1))]) \
        == "26bc05e9f7fab58aeb631908b9876173217a11811016c2d837e1946f88e8739f"
