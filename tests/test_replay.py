"""DistiLLM's schedule and replay buffer (kdbench/engine/replay.py) against hand-worked cases:
capacity and first-in-first-out eviction, draws without replacement keyed by (seed, step), the
probability raised by a rise of ``eps`` in the validation loss, and the per-step choice between
a fresh sample, a replay and the dataset. Whole runs and resume with the ``distillm`` sampler:
tests/test_samplers.py and tests/test_seams.py."""

from __future__ import annotations

import json

import pytest

from kdbench.engine.replay import AdaptiveSchedule, KeptSample, ReplayBuffer, keyed_uniform


def kept(n: int, start: int = 0) -> list[KeptSample]:
    return [KeptSample(f"e{i}@step1", (1, 2), (i, 0)) for i in range(start, start + n)]


def test_the_buffer_holds_its_capacity_and_evicts_the_oldest_first():
    buf = ReplayBuffer(3)
    buf.add(kept(2))
    assert len(buf) == 2 and not buf.full
    buf.add(kept(2, start=2))  # e0 goes: capacity 3 keeps e1, e2, e3
    assert len(buf) == 3 and buf.full and [s.key for s in buf.items] == ["e1@step1", "e2@step1", "e3@step1"]
    buf.add(kept(3, start=10))  # a whole buffer's worth replaces everything before it
    assert [s.key for s in buf.items] == ["e10@step1", "e11@step1", "e12@step1"]
    with pytest.raises(ValueError, match="at least 1"):
        ReplayBuffer(0)


def test_a_draw_is_distinct_keyed_by_seed_and_step_and_reuses_samples():
    buf = ReplayBuffer(10)
    buf.add(kept(10))
    a = buf.draw(4, seed=0, step=5)
    assert len({s.key for s in a}) == 4  # without replacement
    assert a == buf.draw(4, seed=0, step=5)  # keyed: no stream, no state
    assert a != buf.draw(4, seed=0, step=6) or a != buf.draw(4, seed=1, step=5)
    # reuse: over many steps every sample is drawn, most more than once (4 of 10 per step)
    counts = {s.key: 0 for s in buf.items}
    for step in range(50):
        for s in buf.draw(4, seed=0, step=step):
            counts[s.key] += 1
    assert sum(counts.values()) == 200 and min(counts.values()) >= 1 and max(counts.values()) > 1
    # a whole buffer's draw is a permutation of it
    assert sorted(s.key for s in buf.draw(10, seed=3, step=0)) == sorted(s.key for s in buf.items)
    with pytest.raises(ValueError, match="cannot draw 11 distinct samples from a buffer of 10"):
        buf.draw(11, seed=0, step=0)


def test_the_buffer_round_trips_through_json_in_order():
    buf = ReplayBuffer(4)
    buf.add(kept(6))
    state = json.loads(json.dumps(buf.state_dict()))  # what the train state writes
    again = ReplayBuffer(4)
    again.load_state_dict(state)
    assert list(again.items) == list(buf.items) and again.draw(3, 0, 9) == buf.draw(3, 0, 9)
    again.add(kept(1, start=99))  # eviction goes on from the restored order
    assert [s.key for s in again.items][0] == "e3@step1"
    with pytest.raises(ValueError, match="capacity 4 cannot resume one of 5"):
        ReplayBuffer(5).load_state_dict(state)


def test_the_probability_rises_by_delta_when_the_loss_rises_by_eps():
    # DistiLLM's scripts: start at 0, +0.1 when the loss is at least eps = 0.1 above the loss that last raised it
    s = AdaptiveSchedule(p0=0.0, eps=0.1, delta=0.1, steps=100)
    s.observe(0, 2.00)   # the first loss: the reference, p stays
    s.observe(25, 2.05)  # +0.05 < eps
    s.observe(50, 1.90)  # a fall
    assert s.p == 0.0 and s.last_loss == 2.00
    s.observe(75, 2.10)  # +0.10 over 2.00: raised, and 2.10 is the new reference
    assert s.p == pytest.approx(0.1) and s.last_loss == 2.10 and s.raised_at == [75]
    s.observe(80, 2.15)  # +0.05 over the new reference
    assert s.p == pytest.approx(0.1)
    for step, loss in enumerate([2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1, 4.3], start=81):
        s.observe(step, loss)
    assert s.p == 1.0  # capped
    restored = AdaptiveSchedule(0.0, 0.1, 0.1, 100)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.state_dict() == s.state_dict()


def test_each_step_samples_anew_replays_or_takes_the_dataset_by_hand():
    # p = 0.8 over 10 steps: fresh share at step k (0-based) is 0.8 * (1 - (k + 1) / 10)
    s = AdaptiveSchedule(p0=0.8, eps=0.1, delta=0.1, steps=10)
    empty, full = ReplayBuffer(2), ReplayBuffer(2)
    full.add(kept(2))
    # step 4: fresh share 0.8 * 0.5 = 0.4
    assert s.choose(4, 0.39, full) == "student"
    assert s.choose(4, 0.41, full) == "replay"     # 0.4 <= u < p: replay once the buffer is full ...
    assert s.choose(4, 0.41, empty) == "student"   # ... and a new sample while it is not (DistiLLM's rule)
    assert s.choose(4, 0.80, full) == "dataset" == s.choose(4, 0.95, empty)
    # the last step: fresh share 0, so only replays or the dataset
    assert s.choose(9, 0.0, full) == "replay" and s.choose(9, 0.79, full) == "replay"
    assert s.choose(9, 0.81, full) == "dataset"
    # p = 0: always the dataset (distillm's default start, until the loss rises)
    assert AdaptiveSchedule(0.0, 0.1, 0.1, 10).choose(0, 0.0, empty) == "dataset"


def test_the_keyed_uniform_is_gkds_coin_and_streams_are_apart():
    import hashlib

    digest = hashlib.sha256(b"kdbench-sampler-coin:7:3").digest()
    assert keyed_uniform(7, 3) == int.from_bytes(digest[:8], "big") / 2.0 ** 64  # gkd's coin, unchanged
    assert keyed_uniform(7, 3, "replay") != keyed_uniform(7, 3)
    values = [keyed_uniform(0, k) for k in range(1000)]
    assert 0.0 <= min(values) and max(values) < 1.0 and 0.45 < sum(values) / 1000 < 0.55
