"""Where training data comes in: the suite's encoded examples as packed batches in a fixed
order, with a resumable cursor.

A step's batch is ``batch_size`` examples drawn in the order fixed by ``(seed, epoch)`` — the
same for every objective, so runs on one suite and seed differ only in the loss — and packed
into one row (``Batch`` and ``pack``, with the shapes: kdbench/data/batching.py).
:class:`RankBatches` is one rank's share of that order when several processes train together.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from kdbench.data.batching import Batch, Encoded, pack

ORDER_RULE = "epoch k: random.Random(seed * 100003 + k).shuffle(range(n)); consecutive batch_size slices, last partial dropped"


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


class PackedBatches:
    """Endless packed batches in the fixed per-seed order, with a cursor (``state_dict``).

    ``examples`` are ``(example_id, Encoded)`` pairs. The cursor is ``(epoch, index of the next
    batch in the epoch)``; ``load_state_dict`` continues exactly where a saved source stopped
    (the resume seam). ``describe()`` is what a run records about its data order.
    """

    def __init__(self, examples: Sequence[tuple[str, Encoded]], batch_size: int, seed: int, pad_id: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples are fewer than one batch of {batch_size}")
        ids = [i for i, _ in examples]
        if len(set(ids)) != len(ids):
            raise ValueError("training example ids must be unique (the teacher cache is indexed by them)")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.epoch = 0
        self.index = 0  # next batch within the epoch
        self._order = epoch_order(len(self.examples), seed, 0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = epoch_order(len(self.examples), self.seed, self.epoch)
        picked = [self.examples[i] for i in self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]]
        self.index += 1
        return pack([e for _, e in picked], [i for i, _ in picked], self.pad_id)

    def peek(self) -> Batch:
        """The batch the next ``next()`` returns, without moving the cursor (the start-up check's batch)."""
        saved = (self.epoch, self.index, self._order)
        try:
            return next(self)
        finally:
            self.epoch, self.index, self._order = saved

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "batch_size": self.batch_size,
                "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["batch_size"], state["n_examples"]) != (self.seed, self.batch_size, len(self.examples)):
            raise ValueError(f"batch cursor {state} does not belong to this data (seed {self.seed}, batch size "
                             f"{self.batch_size}, {len(self.examples)} examples)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = epoch_order(len(self.examples), self.seed, self.epoch)

    def describe(self) -> dict:
        """The order rule, a digest of epoch 0's example order, and the packing (stored with a run)."""
        first = [self.examples[i][0] for i in epoch_order(len(self.examples), self.seed, 0)]
        digest = hashlib.sha256("\n".join(first).encode()).hexdigest()[:16]
        return {"order": ORDER_RULE, "seed": self.seed, "epoch0_order_sha256": digest,
                "packing": "each batch's sequences end to end in one row, positions restart per sequence, no padding",
                "batches_per_epoch": self.batches_per_epoch}


class RankBatches:
    """Rank ``rank``'s share of ``source`` when ``world`` processes train together: at each step
    every rank draws the next ``world`` batches of the source's order and keeps the ``rank``-th,
    so one step of all ranks together covers what ``world`` steps of one process would, each
    batch once. With DDP averaging the gradients, a step is then the gradient of the mean of
    the ranks' losses (tests/test_data_parallel.py checks it against that computed in one process).
    The cursor is the source's (always at a multiple of ``world``) plus the rank and world, so a
    run resumes only with the same number of processes."""

    def __init__(self, source: PackedBatches, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.source, self.rank, self.world = source, rank, world

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        drawn = [next(self.source) for _ in range(self.world)]
        return drawn[self.rank]

    def state_dict(self) -> dict:
        return {**self.source.state_dict(), "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("rank"), state.get("world")) != (self.rank, self.world):
            raise ValueError(f"batch cursor of rank {state.get('rank')} of {state.get('world')} cannot resume "
                             f"rank {self.rank} of {self.world}")
        self.source.load_state_dict({k: v for k, v in state.items() if k not in ("rank", "world")})
